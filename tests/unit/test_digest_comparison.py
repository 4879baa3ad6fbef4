"""Pure replica comparison: the authority table, localisation (property-tested), agreement figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.digests import hashing
from detectors.digests import (
    Answers,
    Authority,
    Difference,
    Localisation,
    ReplicaDigest,
    TreeEntry,
    Want,
    decide_authority,
    localise,
    localise_with,
    measure_agreement,
)

A, B, C = "blake3:" + "a" * 64, "blake3:" + "b" * 64, "blake3:" + "c" * 64
SHA = "sha256:" + "a" * 64


def replica(node: str, root: str, state: str = "ok", manifest: str | None = None) -> ReplicaDigest:
    return ReplicaDigest(node=node, root=root if state == "ok" else "", state=state,  # type: ignore[arg-type]
                         manifest_root=manifest)


# --- authority ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "kind", "root", "matching", "divergent", "unknown"), [
    pytest.param([replica("n1", A), replica("n2", A), replica("n3", A)],
                 "majority", A, ("n1", "n2", "n3"), (), (), id="all-agree"),
    pytest.param([replica("n1", A), replica("n2", B), replica("n3", A)],
                 "majority", A, ("n1", "n3"), ("n2",), (), id="2-vs-1"),
    pytest.param([replica("n1", A), replica("n2", B)],
                 "none", None, (), (), (), id="1-vs-1"),
    pytest.param([replica("n1", A), replica("n2", A), replica("n3", B), replica("n4", B)],
                 "none", None, (), (), (), id="2-vs-2"),
    pytest.param([replica("n1", A), replica("n2", B), replica("n3", C)],
                 "none", None, (), (), (), id="three-way"),
    pytest.param([replica("n1", A, manifest=B), replica("n2", A, manifest=B), replica("n3", B, manifest=B)],
                 "manifest", B, ("n3",), ("n1", "n2"), (), id="manifest-beats-majority"),
    pytest.param([replica("n1", A, manifest=B), replica("n2", C, manifest=B), replica("n3", C)],
                 "manifest", B, (), ("n1", "n2", "n3"), (), id="manifest-without-a-source"),
    pytest.param([replica("n1", A, manifest=B), replica("n2", C)],
                 "none", None, (), (), (), id="manifest-of-one-of-two-is-not-enough"),
    # One compromised node reporting a manifest of its own tree is one node's word, whatever it claims:
    pytest.param([replica("n1", A), replica("n2", A), replica("n3", A), replica("evil", B, manifest=B)],
                 "none", None, (), (), (), id="a-lone-manifest-does-not-rule-the-honest-replicas"),
    pytest.param([replica("n1", A, manifest=A), replica("n2", A, manifest=A), replica("evil", B, manifest=B)],
                 "none", None, (), (), (), id="a-rival-manifest-blocks-but-never-wins"),
    pytest.param([replica("n1", C, manifest=B), replica("n2", C, manifest=B), replica("n3", B)],
                 "manifest", B, ("n3",), ("n1", "n2"), (), id="a-majority-of-manifests-decides"),
    pytest.param([replica("n1", B, manifest=B), replica("n2", C, manifest=B), replica("n3", C), replica("n4", C)],
                 "none", None, (), (), (), id="half-the-replicas-reporting-a-manifest-is-not-a-majority"),
    pytest.param([replica("n1", A, manifest=A), replica("n2", B, manifest=B)],
                 "none", None, (), (), (), id="manifests-disagree"),
    pytest.param([replica("n1", A), replica("n2", A), replica("n3", "", "settling")],
                 "majority", A, ("n1", "n2"), (), ("n3",), id="2-of-3-with-one-settling"),
    pytest.param([replica("n1", A), replica("n2", "", "settling"), replica("n3", "", "error")],
                 "none", None, (), (), ("n2", "n3"), id="1-of-3-is-no-majority"),
    pytest.param([replica("n1", A), replica("n2", A), replica("n3", SHA)],
                 "majority", A, ("n1", "n2"), (), ("n3",), id="other-algorithm-is-unknown"),
    pytest.param([replica("n1", "", "settling")], "none", None, (), (), ("n1",), id="nothing-to-compare"),
    pytest.param([replica("n1", A)], "majority", A, ("n1",), (), (), id="single-replica"),
])
def test_authority_decisions(replicas: list[ReplicaDigest], kind: str, root: str | None, *,
                             matching: tuple[str, ...], divergent: tuple[str, ...], unknown: tuple[str, ...]) -> None:
    authority = decide_authority(replicas)
    assert (authority.kind, authority.root, authority.matching, authority.divergent, authority.unknown) == (
        kind, root, matching, divergent, unknown), authority.reason


def test_no_authority_says_why_and_shows_the_groups() -> None:
    authority = decide_authority([replica("n1", A), replica("n2", B)])
    assert "no strict majority among 2 replicas: 1 vs 1" in authority.reason
    assert authority.groups == ((A, ("n1",)), (B, ("n2",)))
    assert "no repair source" in decide_authority([replica("n1", A, manifest=B)]).reason
    lone = decide_authority([replica("n1", A), replica("n2", A), replica("evil", B, manifest=B)])
    assert "only 1 of 3 replicas report the manifest" in lone.reason


# --- agreement ------------------------------------------------------------------------------------


def test_agreement_figures() -> None:
    agree = decide_authority([replica("n1", A), replica("n2", A)])
    everyone = measure_agreement(agree, authority_files=10, localised={})
    assert (everyone.replicas, everyone.files) == (1.0, 1.0)

    split = decide_authority([replica("n1", A), replica("n2", B), replica("n3", A)])
    assert measure_agreement(split, authority_files=10).files is None  # n2 not localised yet
    diffs = Localisation((Difference("x", "file", "changed"), Difference("new", "file", "extra"),
                          Difference("d", "dir", "missing")), rounds=2)
    figures = measure_agreement(split, authority_files=10, localised={"n2": diffs})
    assert figures.replicas == pytest.approx(2 / 3)
    assert figures.files == pytest.approx((10 + 10 + 9) / (10 + 10 + 11))

    none = measure_agreement(decide_authority([replica("n1", A), replica("n2", B)]), authority_files=10)
    assert (none.replicas, none.files) == (None, None)
    settling = decide_authority([replica("n1", A), replica("n2", A), replica("n3", "", "settling")])
    assert measure_agreement(settling).replicas == pytest.approx(2 / 3)


# --- localisation ---------------------------------------------------------------------------------

CHUNK = 8
ALG = hashing.SHA256


@dataclass
class Tree:
    """An in-memory dataset, hashed exactly as the agents hash one on disk."""

    files: dict[str, tuple[bytes, int]]
    dirs: dict[str, list[TreeEntry]] = field(default_factory=dict)
    chunks: dict[str, list[str]] = field(default_factory=dict)
    root: str = ""

    def __post_init__(self) -> None:
        self.root = hashing.render_digest(ALG, self._build(""))

    def _build(self, path: str) -> bytes:
        prefix = f"{path}/" if path else ""
        names: dict[str, str] = {}
        for file in self.files:
            if file.startswith(prefix):
                rest = file[len(prefix):]
                names[rest.split("/")[0]] = "dir" if "/" in rest else "file"
        entries: list[hashing.Entry] = []
        for name, kind in sorted(names.items()):
            child = prefix + name
            if kind == "dir":
                digest = self._build(child)
                size = sum(len(data) for f, (data, _) in self.files.items() if f.startswith(child + "/"))
                entries.append(hashing.Entry(name, "dir", 0o755, digest, size))
            else:
                data, mode = self.files[child]
                chunk_hashes = [hashing.hash_chunk(ALG, data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
                self.chunks[child] = [hashing.render_digest(ALG, h) for h in chunk_hashes]
                digest = hashing.hash_file(ALG, len(data), CHUNK, chunk_hashes)
                entries.append(hashing.Entry(name, "file", mode, digest, len(data)))
        self.dirs[path] = [TreeEntry(e.name, e.type, e.mode, hashing.render_digest(ALG, e.hash), e.size)
                           for e in entries]
        return hashing.hash_directory(ALG, entries)


def serve(reference: Tree, replica_tree: Tree, log: list[Want]) -> object:
    trees = {"reference": reference, "replica": replica_tree}

    def fetch(want: Want) -> Answers:
        log.append(want)
        for side, path in want.trees:
            assert path in trees[side].dirs, f"asked {side} for a directory it does not have: {path!r}"
        return Answers(trees={(side, path): trees[side].dirs[path] for side, path in want.trees},
                       files={(side, path): trees[side].chunks[path] for side, path in want.files})
    return fetch


NAMES = st.sampled_from(["a", "b", "c", "d", "e"])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map("/".join)
MODES = st.sampled_from([0o644, 0o600, 0o755])


def _consistent(paths: list[str]) -> list[str]:
    """Drop paths that would be both a file and a directory."""
    chosen: list[str] = []
    for path in paths:
        if any(other.startswith(path + "/") or path.startswith(other + "/") or other == path for other in chosen):
            continue
        chosen.append(path)
    return chosen


@st.composite
def edited_trees(draw: st.DrawFn) -> tuple[dict[str, tuple[bytes, int]], dict[str, tuple[bytes, int]],
                                           dict[str, tuple[str, tuple[int, ...] | None]]]:
    paths = _consistent(draw(st.lists(PATHS, min_size=1, max_size=25)))
    original = {p: (draw(st.binary(max_size=40)), draw(MODES)) for p in paths}
    edited = dict(original)
    expected: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for path in paths:
        action = draw(st.sampled_from(["keep", "keep", "flip", "append", "mode", "delete"]))
        data, mode = original[path]
        if action == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            edited[path] = (data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:], mode)
            expected[path] = ("changed", (at // CHUNK,))
        elif action == "append":
            edited[path] = (data + draw(st.binary(min_size=1, max_size=20)), mode)
            expected[path] = ("changed", (len(data) // CHUNK,) if len(data) % CHUNK else ())
        elif action == "mode":
            new_mode = draw(MODES.filter(lambda m, mode=mode: m != mode))
            edited[path] = (data, new_mode)
            expected[path] = ("mode", None)
        elif action == "delete":
            del edited[path]
            expected[path] = ("missing", None)
    for path in _consistent(paths + draw(st.lists(PATHS, max_size=5)))[len(paths):]:
        edited[path] = (draw(st.binary(max_size=20)), draw(MODES))
        expected[path] = ("extra", None)
    return original, edited, expected


@settings(max_examples=200, deadline=None)
@given(case=edited_trees())
def test_localisation_finds_exactly_the_edited_files_and_chunks_in_depth_rounds(
        case: tuple[dict[str, tuple[bytes, int]], dict[str, tuple[bytes, int]],
                    dict[str, tuple[str, tuple[int, ...] | None]]]) -> None:
    original, edited, expected = case
    reference, replica_tree = Tree(original), Tree(edited)
    log: list[Want] = []
    found = localise_with(serve(reference, replica_tree, log))  # type: ignore[arg-type]
    got = {d.path: (d.change, d.chunks) for d in found.differences if d.type != "dir"}
    assert got == expected
    assert set(found.files) == set(expected)
    assert (reference.root == replica_tree.root) == (not expected)
    depth = max(p.count("/") + 1 for p in [*original, *edited])
    assert found.rounds == len(log) <= depth + 1
    # Directories that appear or vanish as a whole are named too, so a repair can create or remove them.
    gone_dirs = {d.path for d in found.differences if d.type == "dir" and d.change == "missing"}
    assert all(not any(f.startswith(g + "/") for f in edited) for g in gone_dirs)


def test_localisation_walks_only_the_differing_branch() -> None:
    files = {f"d{i}/sub/f{j}": (bytes([i, j]) * 5, 0o644) for i in range(5) for j in range(5)}
    edited = dict(files)
    edited["d3/sub/f1"] = (b"changed!" * 3, 0o644)
    log: list[Want] = []
    found = localise_with(serve(Tree(files), Tree(edited), log))  # type: ignore[arg-type]
    assert found.differences == (Difference("d3/sub/f1", "file", "changed", 10, (0, 1)),)
    assert [w.trees for w in log] == [
        (("reference", ""), ("replica", "")),
        (("reference", "d3"), ("replica", "d3")),
        (("reference", "d3/sub"), ("replica", "d3/sub")),
        (),
    ]
    assert log[-1].files == (("reference", "d3/sub/f1"), ("replica", "d3/sub/f1"))


def test_without_chunks_no_chunk_lists_are_fetched() -> None:
    files = {"a/b": (b"0123456789", 0o644)}
    log: list[Want] = []
    found = localise_with(serve(Tree(files), Tree({"a/b": (b"0123456780", 0o644)}), log),  # type: ignore[arg-type]
                          chunks=False)
    assert found.differences == (Difference("a/b", "file", "changed", 10, None),)
    assert all(not w.files for w in log)


def test_a_file_replaced_by_a_directory_is_reported_on_both_sides() -> None:
    walk = localise()
    want = next(walk)
    assert want == Want(trees=(("reference", ""), ("replica", "")))
    entry_file = TreeEntry("x", "file", 0o644, A, 3)
    entry_dir = TreeEntry("x", "dir", 0o755, B, 4)
    want = walk.send(Answers(trees={("reference", ""): [entry_file], ("replica", ""): [entry_dir]}, files={}))
    assert want.trees == (("replica", "x"),)
    with pytest.raises(StopIteration) as done:
        walk.send(Answers(trees={("replica", "x"): [TreeEntry("y", "file", 0o644, C, 4)]}, files={}))
    result: Localisation = done.value.value
    assert result.differences == (Difference("x", "file", "changed", 3), Difference("x/y", "file", "extra", 4))


def test_the_authority_type_is_frozen() -> None:
    authority = decide_authority([replica("n1", A)])
    assert isinstance(authority, Authority)
    with pytest.raises(AttributeError):
        authority.root = B  # type: ignore[misc]
