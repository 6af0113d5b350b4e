"""The public surface: every name in __all__ exists, and the embedding example works."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import federation_invite

from .support import source_tree_file


class PublicNamesTests(SynchronousTestCase):
    def test_all_names_exist(self) -> None:
        """Every name in federation_invite.__all__ is importable and documented."""
        self.assertEqual(len(set(federation_invite.__all__)), len(federation_invite.__all__))
        for name in federation_invite.__all__:
            value = getattr(federation_invite, name)
            if name != "__version__":
                self.assertTrue(getattr(value, "__doc__", None), name)

    def test_testing_names_exist(self) -> None:
        """Every name in federation_invite.testing.__all__ (the public test helpers) is
        importable and documented."""
        import federation_invite.testing

        names = federation_invite.testing.__all__
        self.assertEqual(len(set(names)), len(names))
        self.assertIn("FakePeersAgent", names)
        for name in names:
            self.assertTrue(getattr(federation_invite.testing, name).__doc__, name)


class EmbeddingExampleTests(TestCase):
    def test_example_serves_app_and_federation(self) -> Deferred[None]:
        """The example serves the app's own resources, /_matrix and (``well_known_server``
        set) /.well-known/matrix/server in one site; other paths are JSON 404s."""
        example_path = source_tree_file("examples", "embed_in_site.py")
        spec = importlib.util.spec_from_file_location("embed_in_site", example_path)
        assert spec is not None and spec.loader is not None
        example: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        config_path = self.mktemp()
        with open(config_path, "w") as handle:
            handle.write(
                f'server_name = "app.example"\ndata_dir = "{self.mktemp()}"\n'
                'well_known_server = "fed.app.example:443"\n'
            )

        async def go() -> None:
            federation = await federation_invite.build_from_config(config_path, reactor)
            try:
                client = StubTreq(example.make_app(federation))
                response = await client.get("https://app.example/")
                self.assertEqual(await response.content(), b"my application\n")
                response = await client.get("https://app.example/_matrix/key/v2/server")
                self.assertEqual(json.loads(await response.content())["server_name"], "app.example")
                response = await client.get("https://app.example/_matrix/federation/v1/version")
                self.assertEqual(response.code, 200)
                response = await client.get("https://app.example/.well-known/matrix/server")
                self.assertEqual(
                    json.loads(await response.content()), {"m.server": "fed.app.example:443"}
                )
                response = await client.get("https://app.example/nothing")
                self.assertEqual(response.code, 404)
                self.assertEqual(json.loads(await response.content())["errcode"], "M_UNRECOGNIZED")
                self.assertEqual(len(federation.handler._listeners), 1)
            finally:
                await federation.close()

        return ensureDeferred(go())


class BuildFromConfigErrorTests(TestCase):
    """build_from_config's failures, as the README's embedding section lists them: a
    ``ConfigError`` naming the key for the configuration, data directory and key file (as
    ``make_service`` raises), a ``StoreError`` (exported here) for the database; nothing
    is left open."""

    async def refusal(self, values: dict[str, Any], error: type[Exception]) -> Exception:
        failed = ensureDeferred(
            federation_invite.build_from_config(federation_invite.Config(values), reactor)
        )
        return await self.assertFailure(failed, error)

    async def test_data_dir_that_is_a_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        open(path, "w").close()
        error = await self.refusal({"data_dir": path}, federation_invite.ConfigError)
        self.assertEqual(
            str(error), f"configuration key 'data_dir': {path} exists and is not a directory"
        )
        self.assertIsInstance(error.__cause__, FileExistsError)

    async def test_bad_key_file(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        key_path = os.path.join(data_dir, "empty.key")
        open(key_path, "w").close()
        error = await self.refusal(
            {"data_dir": data_dir, "signing_key": key_path}, federation_invite.ConfigError
        )
        self.assertEqual(
            str(error), f"configuration key 'signing_key': {key_path}: no signing key in the file"
        )
        from federation_invite.signingkey import SigningKeyError

        self.assertIsInstance(error.__cause__, SigningKeyError)
        under_a_file = os.path.join(key_path, "new.key")
        error = await self.refusal(
            {"data_dir": data_dir, "signing_key": under_a_file}, federation_invite.ConfigError
        )
        self.assertEqual(
            str(error),
            f"configuration key 'signing_key': cannot read signing key file {under_a_file}: "
            "Not a directory",
        )

    async def test_database_that_cannot_be_opened(self) -> None:
        from federation_invite.store import StoreError

        self.assertIs(federation_invite.StoreError, StoreError)
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        garbage = os.path.join(data_dir, "garbage.db")
        with open(garbage, "wb") as handle:
            handle.write(b"x" * 4096)
        error = await self.refusal(
            {"data_dir": data_dir, "database": f"sqlite:///{garbage}"},
            federation_invite.StoreError,
        )
        self.assertIn("file is not a database", str(error))


#: The policy hooks the README's "Python API" section describes, as an embedder writes
#: them: mypy must accept each where a hook is taken, and refuse a plain function.
HOOK_FORMS = """
from __future__ import annotations

from typing import Any

from signedjson.types import SigningKey
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from federation_invite import (
    Config,
    FederationInvite,
    IInvitePolicy,
    InboundInvite,
    InvitePolicy,
    IStore,
    build_components,
)


class PlainHook:
    def check_invite(self, invite: InboundInvite) -> str | None:
        return None if invite.sender.endswith(":good.example") else "no"


class AsyncHook:
    async def check_invite(self, invite: InboundInvite) -> str | None:
        return None


class DeferredHook:
    def check_invite(self, invite: InboundInvite) -> Deferred[str | None]:
        return succeed(None)


@implementer(IInvitePolicy)
class DeclaredHook:
    def check_invite(self, invite: InboundInvite) -> str | None:
        return None


def use(
    federation: FederationInvite,
    policy: InvitePolicy,
    config: Config,
    reactor: Any,
    store: IStore,
    key: SigningKey,
) -> None:
    federation.add_policy_hook(PlainHook())
    federation.add_policy_hook(AsyncHook())
    federation.add_policy_hook(DeferredHook())
    federation.add_policy_hook(DeclaredHook())
    policy.add_hook(AsyncHook())
    build_components(
        config, reactor, store, key, hooks=[PlainHook(), AsyncHook(), DeferredHook(), DeclaredHook()]
    )
    federation.add_policy_hook(lambda invite: None)  # not a hook: the one error
"""


class HookTypingTests(SynchronousTestCase):
    def test_readme_hook_forms_type_check(self) -> None:
        """mypy (with the project's settings) accepts a hook returning a plain value, a
        coroutine or a Deferred, declared IInvitePolicy or not, wherever hooks are taken,
        and refuses an object without check_invite."""
        try:
            from mypy import api
        except ImportError:
            raise SkipTest("mypy is not installed") from None
        config = source_tree_file("pyproject.toml")
        path = os.path.abspath(self.mktemp()) + ".py"
        with open(path, "w") as handle:
            handle.write(HOOK_FORMS)
        cache = os.path.abspath(self.mktemp())
        out, err, status = api.run([path, "--config-file", config, "--cache-dir", cache])
        errors = [line for line in out.splitlines() if ": error:" in line]
        self.assertEqual(len(errors), 1, out + err)
        self.assertIn('"add_policy_hook"', errors[0])
        last_line = HOOK_FORMS.splitlines().index(
            "    federation.add_policy_hook(lambda invite: None)  # not a hook: the one error"
        )
        self.assertIn(f".py:{last_line + 1}: error:", errors[0])
        self.assertEqual(status, 1)


class SourceTreeFilesTests(SynchronousTestCase):
    def test_tests_reading_source_tree_files_skip_without_them(self) -> None:
        """Run against an installed package from a directory holding only tests/ (no
        README.md, pyproject.toml, examples/ or federation_invite/ beside it), the tests that
        read those files skip, naming the missing file, and none fails; the package's own
        sources are read where it was imported from. (In a checkout or an unpacked sdist the
        files are there, and these tests run.)"""
        import shutil
        import subprocess
        import sys

        directory = os.path.abspath(self.mktemp())
        shutil.copytree(
            os.path.dirname(os.path.abspath(__file__)),
            os.path.join(directory, "tests"),
            ignore=shutil.ignore_patterns("__pycache__", "_trial_temp*"),
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted.trial",
                "tests.test_config.ReadmeTests",
                "tests.test_layers",
                "tests.test_public_api.EmbeddingExampleTests",
                "tests.test_public_api.HookTypingTests",
                "tests.test_testing.ReadmeExampleTests",
            ],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertRegex(output, r"\nPASSED \(skips=7, successes=2\)\n$")
        for name in ("README.md", "pyproject.toml", os.path.join("examples", "embed_in_site.py")):
            self.assertIn(
                f"{name} is not beside tests/ (a run against an installed package from a "
                "directory without the source tree)",
                output,
            )
