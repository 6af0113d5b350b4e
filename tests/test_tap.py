"""Tests for the twistd plugin: option parsing, overrides and the service tree."""

from __future__ import annotations

import os

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.task import Clock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.service import make_service
from federation_invite.tap import Options, makeService


class OptionsTests(SynchronousTestCase):
    def test_no_config_uses_embedded_default(self) -> None:
        """With no options at all the embedded default configuration is used."""
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["loaded"].server_name, "localhost:8448")
        self.assertIsNone(options["loaded"].path)

    def test_overrides(self) -> None:
        """Each command-line option overrides its config key; --listen repeats."""
        path = self.mktemp()
        FilePath(path).setContent(b'server_name = "file.example"\n')
        options = Options()
        options.parseOptions(
            [
                "--config",
                path,
                "--server-name",
                "cli.example",
                "--listen",
                "tcp:1",
                "--listen",
                "tcp:2",
                "--signing-key",
                "/k",
                "--database",
                "sqlite:///x.db",
                "--data-dir",
                "/d",
            ]
        )
        config = options["loaded"]
        self.assertEqual(config.server_name, "cli.example")
        self.assertEqual(config.listen, ("tcp:1", "tcp:2"))
        self.assertEqual(config.signing_key_path, "/k")
        self.assertEqual(config.database, "sqlite:///x.db")
        self.assertEqual(config.data_dir, "/d")

    def test_bad_config_is_usage_error(self) -> None:
        """A bad value becomes a UsageError naming the key."""
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--server-name", "a b"])
        self.assertIn("'server_name'", str(error))

    def test_plugin_discoverable(self) -> None:
        """twistd's plugin discovery finds the federation-invite ServiceMaker."""
        from twisted.application.service import IServiceMaker

        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("federation-invite", names)


class MakeServiceTests(SynchronousTestCase):
    def test_service_tree(self) -> None:
        """makeService creates the key and one listening service per endpoint."""
        data_dir = self.mktemp()
        options = Options()
        options.parseOptions(["--data-dir", data_dir, "--listen", "tcp:0", "--listen", "tcp:0"])
        service = make_service(options["loaded"], Clock())
        children = list(service)
        self.assertEqual(len(children), 2)
        for child in children:
            self.assertIsInstance(child, StreamServerEndpointService)
        self.assertTrue(os.path.exists(os.path.join(data_dir, "signing.key")))

    def test_make_service_entry_point(self) -> None:
        """The plugin's makeService builds the same tree with the global reactor."""
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--listen", "tcp:0"])
        self.assertEqual(len(list(makeService(options))), 1)
