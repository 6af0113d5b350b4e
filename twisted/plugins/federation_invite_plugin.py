"""twistd plugin: ``twistd -n federation-invite``. One lazy ServiceMaker and nothing else."""

from twisted.application.service import ServiceMaker

federation_invite = ServiceMaker(
    "federation-invite",
    "federation_invite.tap",
    "Matrix server-to-server invite endpoints (federation-invite)",
    "federation-invite",
)
