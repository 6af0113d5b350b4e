"""federation-invite: the Matrix server-to-server invite exchange for Twisted.

The public surface is this module's ``__all__``; everything else is internal
and may change. See the README's "Python API" section.
"""

from ._version import __version__
from .auth import RequestAuthenticator, ServerAcl
from .config import Config, ConfigError, load_config
from .core.errors import Codes, MatrixError
from .inbound import InviteHandler, InviteLimits
from .keyring import Keyring
from .outbound import (
    InvalidInviteAnswer,
    InviteError,
    InviteNotSendable,
    InviteRefused,
    InviteSender,
    InviteTransportError,
)
from .policy import IInvitePolicy, InboundInvite, InvitePolicy, InvitePolicyHook
from .service import (
    FederationInvite,
    FederationInviteService,
    build_components,
    build_from_config,
    make_service,
)
from .signer import ISigner, LocalSigner
from .store import InviteRecord, InviteRule, IStore, StoreError, open_store
from .web.site import FederationSite

__all__ = [
    "Codes",
    "Config",
    "ConfigError",
    "FederationInvite",
    "FederationInviteService",
    "FederationSite",
    "IInvitePolicy",
    "ISigner",
    "IStore",
    "InboundInvite",
    "InvalidInviteAnswer",
    "InviteError",
    "InviteHandler",
    "InviteLimits",
    "InviteNotSendable",
    "InvitePolicy",
    "InvitePolicyHook",
    "InviteRecord",
    "InviteRefused",
    "InviteRule",
    "InviteSender",
    "InviteTransportError",
    "Keyring",
    "LocalSigner",
    "MatrixError",
    "RequestAuthenticator",
    "ServerAcl",
    "StoreError",
    "__version__",
    "build_components",
    "build_from_config",
    "load_config",
    "make_service",
    "open_store",
]
