"""The ``castore`` command line, driven as the shell drives it: a real subprocess on a real store.

Every subcommand is run; --json documents are parsed and checked against the Python API;
exit codes (0 ok, 1 problems, 2 usage) and one-line errors are asserted; read-only
commands leave the store byte-identical; a damaged store fails verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import castore

ROWS, WIDTH = 512, 256  # the agent's weight: 512 KiB of float32, 4 chunks of 128 KiB


def run(*args, check: int | None = 0, env=None) -> subprocess.CompletedProcess:
    """``castore ARGS`` in a child process; ``check`` is the exit status expected."""
    child = subprocess.run(
        [sys.executable, "-m", "castore", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if check is not None:
        assert child.returncode == check, f"castore {args}: exit {child.returncode}\n{child.stdout}\n{child.stderr}"
    return child


def run_json(*args, check: int = 0) -> dict:
    child = run(*args, "--json", check=check)
    document = json.loads(child.stdout)
    assert document["castore_json"] == 1 and document["kind"] == str(args[0])
    return document


def weights(step: int) -> np.ndarray:
    w = np.arange(ROWS * WIDTH, dtype=np.float32).reshape(ROWS, WIDTH)
    w[: step // 100 + 1] += step  # rows 0..k change: only the first chunk of 4 differs between saves
    return w


def state(step: int) -> dict:
    return {
        "agent": {"w": weights(step), "step": step, "lr": 3e-4, "name": "dreamer", "count": np.int64(step)},
        "replay": {"obs": np.zeros((64, 32, 32, 3), np.uint8) + 7},  # the same every step: stored once
    }


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store"
    with castore.Store(path, chunk_bytes=128 * 1024) as store:
        for step in (0, 100, 200, 300):
            store.save(step, state(step), metrics={"loss": 1.0 / (step + 1)})
        store.tag("best", 200)
    return path


def digest_tree(path) -> dict:
    """Every file under ``path`` with its bytes' digest and mtime: what must not change.

    Not ``lock.mdb``: LMDB's shared reader table, where every reader (of any program)
    registers while it reads; it holds no data of the store."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name == "lock.mdb":
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(full).st_mtime_ns)
    return out


# -- the command itself ----------------------------------------------------------------------------


def test_version_and_help_read_well():
    version = run("--version").stdout
    from importlib.metadata import version as installed

    assert version.strip() == f"castore {installed('castore')}"
    text = run("--help").stdout
    for command in ("ls", "show", "diff", "du", "tags", "tag", "untag", "delete", "gc", "compact", "verify"):
        assert f" {command}" in text
    for command in ("branches", "fork", "rollback", "export", "import", "report", "demo"):
        assert command in text
    assert "``" not in text and ":class:" not in text  # no raw RST
    assert "--json" in run("ls", "--help").stdout


def test_bad_arguments_are_usage_errors_with_one_line(store_path):
    for args in (
        ["nosuchcommand"],
        ["ls"],
        ["verify", store_path, "--sample", "0"],
        ["gc", store_path, "--keep", "x=1"],
    ):
        child = run(*args, check=2)
        assert "Traceback" not in child.stderr and child.stderr.strip()


def test_unknown_store_step_tag_branch_and_component_list_what_exists(store_path, tmp_path):
    child = run("ls", tmp_path / "nosuch", check=2)
    assert "no castore store" in child.stderr and not (tmp_path / "nosuch").exists()
    child = run("show", store_path, 7, check=2)
    assert child.stderr.count("\n") == 1 and "0, 100, 200, 300" in child.stderr
    child = run("show", store_path, "nosuch", check=2)
    assert "tags: best" in child.stderr
    child = run("ls", store_path, "--branch", "nosuch", check=2)
    assert "branches: main" in child.stderr
    child = run("show", store_path, "--keys", "nosuch", check=2)
    assert "'agent', 'replay'" in child.stderr
    child = run("diff", store_path, 0, 9, check=2)
    assert "its steps" in child.stderr


def test_debug_shows_the_traceback(store_path):
    assert "Traceback" not in run("show", store_path, 7, check=2).stderr
    assert "Traceback" in run("show", store_path, 7, "--debug", check=2).stderr
    assert "Traceback" in run("--debug", "show", store_path, 7, check=2).stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    path = tmp_path / "wide"
    with castore.Store(path) as store:
        store.save(0, {"c": {f"leaf{i}": i for i in range(20000)}})  # ~500 KB of `show` output
    child = subprocess.Popen(
        [sys.executable, "-m", "castore", "show", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout.readline().startswith(b"step 0")
    child.stdout.close()  # as `| head -1` does
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# -- looking ----------------------------------------------------------------------------------------


def test_ls_lists_every_step_with_its_facts(store_path):
    doc = run_json("ls", store_path)
    steps = doc["steps"]
    assert [s["step"] for s in steps] == [0, 100, 200, 300]
    assert all(s["branch"] == "main" for s in steps)
    assert [s["tags"] for s in steps] == [[], [], ["best"], []]
    assert steps[1]["metrics"] == {"loss": pytest.approx(1 / 101)}
    with castore.Store(store_path, readonly=True) as store:
        usage = store.usage()
        logical = store.manifest(300).logical_bytes
        held = store.stats().stored_bytes
    assert [s["logical_bytes"] for s in steps] == [logical] * 4
    assert sum(s["new_bytes"] for s in steps) == usage.live_bytes == held  # every stored byte is new once
    # the first step holds all of it; each later one a changed first chunk of agent/w
    assert steps[0]["new_bytes"] > steps[1]["new_bytes"] > 0 and steps[1]["new_bytes"] <= 128 * 1024 + 1024
    for s in steps:
        assert s["save"]["seconds"] >= s["save"]["blocked_seconds"] > 0 and s["save"]["written_bytes"] == s["new_bytes"]
        assert s["created_utc"].endswith("Z")
    text = run("ls", store_path).stdout
    assert text.splitlines()[0].split()[:3] == ["STEP", "BRANCH", "SAVED"] and "best" in text and "KiB" in text


def test_show_prints_the_component_tree(store_path):
    doc = run_json("show", store_path, "best")
    assert (doc["step"], doc["branch"], doc["tags"]) == (200, "main", ["best"])
    leaves = {leaf["path"]: leaf for c in doc["components"] for leaf in c["leaves"]}
    w = leaves["agent/w"]
    assert (w["kind"], w["dtype"], w["shape"], w["nbytes"], w["chunks"]) == (
        "array",
        "float32",
        [ROWS, WIDTH],
        ROWS * WIDTH * 4,
        4,
    )
    assert leaves["agent/step"] == {"path": "agent/step", "kind": "value", "type": "int", "value": 200, "nbytes": 8}
    assert leaves["agent/name"]["value"] == "dreamer" and leaves["agent/lr"]["value"] == 3e-4
    assert (leaves["agent/count"]["kind"], leaves["agent/count"]["value"]) == ("scalar", 200)
    assert leaves["replay/obs"]["shape"] == [64, 32, 32, 3]
    assert run_json("show", store_path)["step"] == 300  # default: the latest
    text = run("show", store_path, 100, "--keys", "agent").stdout
    assert "agent/w: array float32 [512, 256]  512 KiB (4 chunks)" in text and 'agent/name: str = "dreamer"' in text
    assert "replay" not in text


def test_diff_names_the_changed_leaves_chunks_and_bytes(store_path):
    doc = run_json("diff", store_path, 100, 200)
    changes = {c["path"]: c for c in doc["changes"]}
    assert set(changes) == {"agent/w", "agent/step", "agent/count"}  # lr, name and the replay are the same
    w = changes["agent/w"]
    assert (w["change"], w["chunks"], w["changed_chunks"], w["changed_bytes"]) == ("changed", 4, 1, 128 * 1024)
    assert changes["agent/step"]["a"]["value"] == 100 and changes["agent/step"]["b"]["value"] == 200
    assert doc["same_leaves"] == 3 and doc["new_chunks"] == 1
    with castore.Store(store_path, readonly=True) as store:
        step_200 = next(s for s in store.usage().steps if s.step == 200)
    assert doc["new_bytes"] == step_200.new_bytes  # what 200 added after 100
    assert run_json("diff", store_path, 300, 300)["changes"] == []
    text = run("diff", store_path, 0, "best").stdout
    assert "M agent/w: 1 of 4 chunks, 128 KiB" in text and "M agent/step: int = 0 -> int = 200" in text


def test_diff_across_branches_and_of_added_and_removed_components(store_path):
    with castore.Store(store_path, branch="other") as store:
        store.save(5, {"agent": state(300)["agent"], "extra": np.ones(10)})
    doc = run_json("diff", store_path, 300, 5, "--branch-b", "other")
    kinds = {c["path"]: c["change"] for c in doc["changes"]}
    assert kinds == {"extra": "added", "replay/obs": "removed"}
    assert doc["b"] == {"branch": "other", "step": 5}


def test_du_accounts_for_every_byte_and_what_gc_would_free(store_path):
    doc = run_json("du", store_path)
    with castore.Store(store_path, readonly=True) as store:
        stats = store.stats()
    assert doc["steps"] == 4 and doc["stored_bytes"] == doc["held_bytes"] == stats.stored_bytes
    assert doc["logical_bytes"] == stats.logical_bytes and doc["file_bytes"] == stats.file_bytes
    assert doc["gc_bytes"] == 0
    names = {c["name"]: c for c in doc["components"]}
    assert names["replay"]["logical_bytes"] == 4 * 64 * 32 * 32 * 3 and names["replay"]["raw_bytes"] == 64 * 32 * 32 * 3
    assert names["replay"]["stored_bytes"] < names["replay"]["raw_bytes"] / 50  # constant frames compress
    assert doc["dedup_ratio"] == pytest.approx(doc["logical_bytes"] / doc["raw_bytes"])
    assert doc["compression_ratio"] == pytest.approx(doc["raw_bytes"] / doc["stored_bytes"])
    assert sum(s["new_bytes"] for s in doc["per_step"]) == doc["stored_bytes"]
    run("delete", store_path, 0)
    after = run_json("du", store_path)
    assert after["gc_bytes"] > 0 and after["held_bytes"] - after["stored_bytes"] == after["gc_bytes"]
    text = run("du", store_path).stdout
    assert "gc frees" in text and "COMPONENT" in text and "dedup" in text


def test_tags_and_branches(store_path):
    assert run_json("tags", store_path)["tags"] == [{"name": "best", "branch": "main", "step": 200}]
    assert run_json("branches", store_path)["branches"] == [{"name": "main", "steps": 4, "first": 0, "latest": 300}]
    assert run("tags", store_path).stdout.split() == ["best", "200"]


def test_read_only_commands_change_nothing(store_path, tmp_path):
    before = digest_tree(store_path)
    for args in (
        ["ls"],
        ["show"],
        ["show", "best"],
        ["diff", 0, 300],
        ["du"],
        ["tags"],
        ["branches"],
        ["verify"],
        ["verify", "--sample", "10%"],
        ["steps"],
        ["stats"],
        ["gc", "--dry-run"],
        ["gc", "--dry-run", "--keep", "1"],
        ["export", 100, tmp_path / "out"],
    ):
        run(args[0], store_path, *args[1:])
        assert digest_tree(store_path) == before, args


# -- changing -----------------------------------------------------------------------------------------


def test_tag_untag_and_their_errors(store_path):
    assert run_json("tag", store_path, 100, "base") == {
        "castore_json": 1,
        "kind": "tag",
        "store": str(store_path),
        "name": "base",
        "branch": "main",
        "step": 100,
    }
    assert "names step 200 already" in run("tag", store_path, 300, "best", check=2).stderr
    run("tag", store_path, 300, "best", "--move")
    assert "a tag is not all digits" in run("tag", store_path, 300, "123", check=2).stderr
    with castore.Store(store_path, readonly=True) as store:
        assert store.tags() == {"base": 100, "best": 300}
    assert run_json("untag", store_path, "base")["step"] == 100
    assert "tags: best" in run("untag", store_path, "base", check=2).stderr
    with castore.Store(store_path, readonly=True) as store:
        assert store.tags() == {"best": 300} and store.steps() == [0, 100, 200, 300]


def test_delete_refuses_tagged_and_unknown_steps_whole(store_path):
    assert "untag it" in run("delete", store_path, 200, check=2).stderr
    assert "no step 7" in run("delete", store_path, 0, 7, check=2).stderr
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == [0, 100, 200, 300]  # 0 was not deleted before 7 was found missing
    doc = run_json("delete", store_path, 0, 100, "--gc")
    assert doc["deleted"] == [0, 100] and doc["gc"]["freed_bytes"] > 0
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == [200, 300] and store.verify().ok and store.plan_gc().is_empty


def test_gc_dry_run_changes_nothing_and_predicts_the_real_run(store_path):
    run("untag", store_path, "best")
    before = digest_tree(store_path)
    dry = run_json("gc", store_path, "--keep", "last=2", "--dry-run")
    assert dry["dry_run"] and dry["deleted_steps"] == [0, 100] and dry["freed_bytes"] > 0
    assert digest_tree(store_path) == before
    real = run_json("gc", store_path, "--keep", "last=2")
    assert real["deleted_steps"] == [0, 100] and real["freed_bytes"] == dry["freed_bytes"]
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == [200, 300] and store.verify().ok
        for step in (200, 300):
            np.testing.assert_array_equal(store.load(step)["agent"]["w"], weights(step))
    assert run_json("gc", store_path)["freed_bytes"] == 0


def test_gc_keep_policies_parse(store_path):
    doc = run_json("gc", store_path, "--keep", "best=1,metric=loss,mode=min", "--dry-run")
    assert doc["deleted_steps"] == [0, 100]  # 300 has the lowest loss and is the latest; 200 is tagged
    assert run_json("gc", store_path, "--keep", "1", "--dry-run")["deleted_steps"] == [0, 100]
    assert "needs metric" in run("gc", store_path, "--keep", "best=1", check=2).stderr
    child = run("gc", store_path, "--keep", "best=1,metric=lsos", check=2)  # a typo would delete almost all
    assert "recorded: loss" in child.stderr


def test_compact_returns_the_file_to_its_used_size(store_path):
    run("untag", store_path, "best")
    run("gc", store_path, "--keep", "1")
    doc = run_json("compact", store_path)
    assert doc["file_bytes_after"] < doc["file_bytes_before"]
    assert run_json("du", store_path)["file_bytes"] == doc["file_bytes_after"]
    with castore.Store(store_path, readonly=True) as store:
        np.testing.assert_array_equal(store.load(300)["agent"]["w"], weights(300))


def test_fork_and_rollback(store_path):
    doc = run_json("fork", store_path, "exp", "best")
    assert doc["from"] == {"branch": "main", "step": 200}
    assert "exists" in run("fork", store_path, "exp", 100, check=2).stderr
    doc = run_json("rollback", store_path, 100)
    assert doc["moved_to"] == "main-abandoned-100" and doc["moved"] == [200, 300]
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == [0, 100] and store.steps(branch="main-abandoned-100") == [200, 300]
        assert store.steps(branch="exp") == [200]
        assert store.locate("best") == ("main-abandoned-100", 200)  # the tag moved with its step
    assert "nothing moved" in run("rollback", store_path, 100).stdout
    listed = run_json("ls", store_path)["steps"]
    assert {(s["branch"], s["step"]) for s in listed} == {
        ("main", 0),
        ("main", 100),
        ("main-abandoned-100", 200),
        ("main-abandoned-100", 300),
        ("exp", 200),
    }
    assert [s["step"] for s in run_json("ls", store_path, "--branch", "exp")["steps"]] == [200]
    doc = run_json("delete-branch", store_path, "exp")
    assert doc["deleted"] == [200]
    # a Checkpoint continues from the rolled-back step
    with castore.Store(store_path) as store:
        store.save(101, state(101))
        assert store.steps() == [0, 100, 101]


# -- verify -----------------------------------------------------------------------------------------


def flip(path, needle: bytes) -> None:
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "r+b") as f:
        data = f.read()
        at = data.find(needle)
        assert at >= 0
        while at >= 0:
            f.seek(at)
            f.write(bytes([data[at] ^ 0xFF]))
            at = data.find(needle, at + 1)


def test_verify_reports_damage_with_exit_1_and_json(tmp_path):
    path = tmp_path / "s"
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(40000).astype(np.float32), rng.standard_normal(40000).astype(np.float32)
    with castore.Store(path, compression="none") as store:
        store.save(1, {"a": a})
        store.save(2, {"b": b})
    assert run_json("verify", path)["ok"]
    flip(path, b[1000:1016].tobytes())
    doc = run_json("verify", path, check=1)
    assert not doc["ok"] and doc["affected_steps"] == [{"branch": "main", "step": 2}]
    (problem,) = doc["problems"]
    assert (problem["kind"], problem["step"], problem["component"]) == ("chunk-corrupt", 2, "b")
    assert run_json("verify", path, "--step", 1)["ok"] and run_json("verify", path, "--step", 1)["steps"] == 1
    run_json("verify", path, "--step", 2, check=1)
    text = run("verify", path, check=1).stdout
    assert "1 steps affected: 2" in text


# -- moving --------------------------------------------------------------------------------------------


def test_export_then_import_round_trips_every_format(store_path, tmp_path):
    for fmt in ("npy", "npz", "safetensors"):
        out = tmp_path / f"out-{fmt}"
        doc = run_json("export", store_path, "best", out, "--format", fmt)
        assert doc["step"] == 200 and doc["format"] == fmt and doc["files"] >= 1
        target = tmp_path / f"back-{fmt}"
        doc = run_json("import", out, target)
        assert doc["step"] == 200 and sorted(doc["components"]) == ["agent", "replay"]
        with castore.Store(target, readonly=True) as store:
            back = store.load(200)
        np.testing.assert_array_equal(back["agent"]["w"], weights(200))
        np.testing.assert_array_equal(back["replay"]["obs"], state(200)["replay"]["obs"])
        assert back["agent"]["name"] == "dreamer" and back["agent"]["step"] == 200
        again = run_json("import", out, target)
        assert again["unchanged"]


def test_report_writes_an_image(store_path, tmp_path):
    from PIL import Image

    out = tmp_path / "report.png"
    doc = run_json("report", store_path, "--out", out)
    assert doc["steps"] == 4 and doc["format"] == "png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 800 <= width <= 4000 and 500 <= height <= 4000
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # a picture, not a blank page
    html = tmp_path / "report.html"
    run("report", store_path, "--out", html)
    text = html.read_text()
    assert "<svg" in text or "data:image/png;base64," in text
    assert "<script src" not in text


def test_demo_runs_the_main_job(tmp_path):
    logdir = tmp_path / "demo"
    child = run("demo", "--", "--logdir", logdir, "--capacity", 256, "--every", 64, "--total", 512, "--pace", 0)
    assert "bit-exact against an uninterrupted run" in child.stdout and "MISMATCH" not in child.stdout
    assert run_json("ls", logdir)["steps"]


def test_progress_bars_show_on_a_terminal_only(store_path, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    for args in (["verify", store_path], ["export", store_path, 100, tmp_path / "tty-out"]):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 wide
        child = subprocess.Popen(
            [sys.executable, "-m", "castore", *map(str, args)], stdout=subprocess.PIPE, stderr=follower
        )
        os.close(follower)
        seen = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            seen += data
        os.close(leader)
        assert child.wait(timeout=120) == 0
        assert f"{args[0]}:".encode() in seen and b"B/s" in seen, seen  # drawn (updates come every 0.1 s)
    piped = run("verify", store_path)
    assert piped.stderr == ""  # quiet when not a terminal
    piped = run("export", store_path, 100, tmp_path / "piped-out")
    assert piped.stderr == ""


def test_while_a_trainer_writes_readers_work_and_writers_are_refused(store_path):
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, numpy as np, castore\n"
            f"s = castore.Store({str(store_path)!r})\n"
            "s.save(400, {'agent': {'w': np.ones(10)}})\n"  # takes the writer lock and keeps it
            "print('saved', flush=True)\n"
            "sys.stdin.readline()\n"
            "s.close()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert trainer.stdout.readline() == "saved\n"
        assert [s["step"] for s in run_json("ls", store_path)["steps"]] == [0, 100, 200, 300, 400]
        assert run_json("verify", store_path)["ok"]
        child = run("tag", store_path, 100, "x", check=1)
        assert "lock" in child.stderr.lower() and child.stderr.count("\n") == 1
        run("gc", store_path, check=1)
    finally:
        trainer.communicate("\n", timeout=60)
    run("tag", store_path, 100, "x")  # the lock went with the trainer


def test_hostile_names_cannot_fake_lines_or_drive_the_terminal(tmp_path):
    path = tmp_path / "s"
    evil = "evil\nstep 9: fake\x1b[2J\u202e"
    with castore.Store(path) as store:
        store.save(0, {evil: {evil: 1, "w": np.zeros(4)}})
        store.save(1, {evil: {evil: 2, "w": np.ones(4)}}, metrics={"lo\x1b[31mss": 1.0})
        store.tag("t\x1b[2J", 1)
    for args in (["show", path], ["diff", path, 0, 1], ["du", path], ["ls", path], ["tags", path]):
        out = run(*args).stdout
        assert "\x1b" not in out and "\u202e" not in out and "\nstep 9" not in out, args
        if args[0] in ("show", "diff", "du"):
            assert "evil\\x0astep 9: fake\\x1b[2J\\u202e" in out, args
    assert "\x1b" not in run("show", path, "nosuchtag", check=2).stderr
    doc = run_json("show", path)
    assert doc["components"][0]["name"] == evil  # JSON carries the name exactly


def test_a_tag_or_branch_step_of_another_branch_is_the_step_acted_on(store_path):
    run("rollback", store_path, 100)  # 200 (tagged best) and 300 move to main-abandoned-100
    with castore.Store(store_path) as store:
        store.save(200, {"other": np.ones(3)})  # main gets its own, different step 200
    run("tag", store_path, "best", "best2")
    assert {t["name"]: (t["branch"], t["step"]) for t in run_json("tags", store_path)["tags"]} == {
        "best": ("main-abandoned-100", 200),
        "best2": ("main-abandoned-100", 200),
    }
    assert run_json("fork", store_path, "fb", "best")["from"] == {"branch": "main-abandoned-100", "step": 200}
    assert run_json("show", store_path, "fb:200")["components"][0]["name"] == "agent"  # the tagged state
    assert run_json("show", store_path, "main-abandoned-100:300")["step"] == 300
    run("tag", store_path, "main:200", "mine")
    with castore.Store(store_path, readonly=True) as store:
        assert store.locate("mine") == ("main", 200)


def test_delete_is_all_or_nothing(store_path):
    assert "untag it" in run("delete", store_path, 100, 200, check=2).stderr  # 200 is tagged
    run("delete", store_path, 300, 300)  # a step named twice is deleted once
    with castore.Store(store_path, readonly=True) as store:
        assert store.steps() == [0, 100, 200]


def test_closed_stdout_or_stderr_never_misreport(store_path):
    child = subprocess.run(
        f"'{sys.executable}' -m castore verify '{store_path}' 2>&-", shell=True, capture_output=True, text=True
    )
    assert child.returncode == 0 and "no problems found" in child.stdout
    child = subprocess.run(
        f"'{sys.executable}' -m castore ls '{store_path}' >&-", shell=True, capture_output=True, text=True
    )
    assert child.returncode == 0 and child.stderr == ""
    child = subprocess.run(
        f"'{sys.executable}' -m castore ls '{store_path}/nosuch' --json 2>&-",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 2 and child.stdout == ""  # the error never lands on stdout


def test_diff_keeps_components_with_slashes_apart(tmp_path):
    path = tmp_path / "s"
    with castore.Store(path) as store:
        store.save(1, {"m": {"a": {"b": 1}}, "m/a": {"b": 5}})
        store.save(2, {"m": {"a": {"b": 2}}, "m/a": {"b": 5}})
    doc = run_json("diff", path, 1, 2, "--all")
    assert [(c["component"], c["leaf"]) for c in doc["changes"]] == [("m", "a/b")]
    assert doc["same_leaves"] == 1 and doc["same"] == ["m/a/b"]


def test_ml_dtypes_is_imported_only_when_a_value_needs_it(tmp_path):
    """Importing ml_dtypes costs ~0.65 s, more than the rest of a CLI command's start."""
    path = tmp_path / "s"
    code = (
        "import sys, castore, castore.tools.cli\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported at start'\n"
        f"s = castore.Store({str(path)!r}, readonly=True)\n"
        "v = s.load(0)['w']\n"
        "assert 'ml_dtypes' in sys.modules and v.dtype.name == 'bfloat16', v.dtype\n"
        "print('ok')\n"
    )
    import ml_dtypes

    with castore.Store(path) as store:
        store.save(0, {"w": np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16)})
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout == "ok\n", child.stderr
