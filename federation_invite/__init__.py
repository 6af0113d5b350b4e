"""federation-invite: the Matrix server-to-server invite exchange for Twisted."""

from ._version import __version__
from .core.errors import Codes, MatrixError

__all__ = ["Codes", "MatrixError", "__version__"]
