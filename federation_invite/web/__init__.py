"""The web edge: the ``/_matrix`` resources and the ``Site`` the daemon listens with."""
