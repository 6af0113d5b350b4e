"""Hypothesis: random mutations of valid invite requests never give a 500, and never a 200 when
the mutation touches anything the event's hashes or signatures cover."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from federation_invite.core.roomversions import KNOWN_ROOM_VERSIONS
from federation_invite.inbound import InviteLimits

from .figures import AnswerTally
from .invites import (
    InviteScenario,
    build_create_event,
    build_invite,
    event_id_of,
    stripped,
    v12_room,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)

#: Keys whose contents no hash or signature covers: changing them may still be accepted.
UNCOVERED = ("signatures", "unsigned")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and list indexes) inside ``value``, the empty path included."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths.extend(_paths(child, (*prefix, index)))
    return paths


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return root


def _delete(root: Any, path: tuple[Any, ...]) -> Any:
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return root


class Fixtures:
    """One valid v2 request per sampled room version, built once."""

    def __init__(self) -> None:
        self.scenario = InviteScenario(
            limits=InviteLimits(origin_burst=10**6, invitee_burst=10**6, origin_per_second=10**6)
        )
        self.requests: list[tuple[str, dict[str, Any], str, str]] = []
        for identifier in ("1", "3", "5", "10", "11", "12"):
            room_version = KNOWN_ROOM_VERSIONS[identifier]
            if room_version.room_id_is_create_event_hash:
                _, create, room_id = v12_room(self.scenario.their_key)
                event = build_invite(room_version, self.scenario.their_key, room_id=room_id)
                state = [create, stripped("m.room.join_rules", "", {"join_rule": "invite"})]
            else:
                event = build_invite(room_version, self.scenario.their_key)
                # A full create event, validated without refusing anything in v1-11.
                create = build_create_event(room_version, self.scenario.their_key)
                state = [create, stripped("m.room.name", "", {"name": "Room"})]
            body = {"room_version": identifier, "event": event, "invite_room_state": state}
            self.requests.append(
                (identifier, body, event["room_id"], event_id_of(room_version, event))
            )


FIXTURES: Fixtures | None = None


def fixtures() -> Fixtures:
    global FIXTURES
    if FIXTURES is None:
        FIXTURES = Fixtures()
    return FIXTURES


def mutate(draw: st.DrawFn, original: Any) -> Any:
    """A deep copy of ``original`` with one value replaced, deleted or added somewhere inside."""
    body = copy.deepcopy(original)
    path = draw(st.sampled_from([p for p in _paths(body) if p]))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        return _set(body, path, draw(json_values))
    if action == "delete":
        return _delete(body, path)
    target = body
    for step in path:
        target = target[step]
    if isinstance(target, dict):
        target[draw(st.text(max_size=8))] = draw(json_values)
    elif isinstance(target, list):
        target.append(draw(json_values))
    else:
        body = _set(body, path, [target, draw(json_values)])
    return body


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[dict[str, Any], str, str, bool]:
    """A mutated request and whether the mutation touched hash- or signature-covered data."""
    _, original, room_id, event_id = draw(st.sampled_from(fixtures().requests))
    body = mutate(draw, original)
    covered = body["event"] != original["event"] if isinstance(body.get("event"), dict) else True
    if covered and isinstance(body.get("event"), dict):
        strip = lambda e: {k: v for k, v in e.items() if k not in UNCOVERED}  # noqa: E731
        covered = strip(body["event"]) != strip(original["event"])
    if body.get("room_version") != original["room_version"]:
        covered = True
    return body, room_id, event_id, covered


class MutationTests(SynchronousTestCase):
    def test_mutations(self) -> None:
        """No mutation gives a 500; none touching covered data gives a 200 (300 generated
        requests; their answers by status printed as a FIGURES line)."""
        self.answers = AnswerTally()
        self.mutation()  # hypothesis runs every example
        self.answers.report("fuzz-inbound-mutations")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_requests())
    def mutation(self, case: tuple[dict[str, Any], str, str, bool]) -> None:
        """One generated request for ``test_mutations``."""
        body, room_id, event_id, covered = case
        scenario = fixtures().scenario
        deferred = scenario.send(2, body, room_id=room_id, event_id=event_id)
        scenario.client.flush()
        response = self.successResultOf(deferred)
        self.answers.count(response.code)
        answer = json.loads(self.successResultOf(response.content()))
        self.assertNotEqual(response.code, 500, answer)
        if covered:
            self.assertNotEqual(response.code, 200, (body, answer))
        if response.code != 200:
            self.assertRegex(answer["errcode"], r"^M_[A-Z_]+$")
            self.assertIsInstance(answer["error"], str)
