"""Deployments that last, on a real local Ray: tune installs, deploy/rollback/deployments, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aitune import deploy_root as layout
from orchestrator.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_OK, main
from orchestrator.records import SelectionRecord
from orchestrator.store import SqliteStore
from serve_helpers import batch_folder, install_runner_up, tuned_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tuned(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy-root")
    root = tmp / "deploy-root"
    spec, outcome = tuned_store(tmp, root)
    return {"spec": spec, "outcome": outcome, "root": root, "store": Path(spec.store), "tmp": tmp}


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(argv))
    return code, [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def installs(tuned) -> list:
    with SqliteStore(tuned["store"]) as store:
        return store.installs()


def snapshot(root: Path) -> dict:
    """Every file under a deploy root with its bytes: what "nothing live touched" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def test_tune_installs_the_verified_winner_and_the_store_records_it(tuned):
    (selection,) = tuned["outcome"].selections
    folder = batch_folder(tuned["root"])
    current = layout.current_version(folder)
    install = layout.read_install(folder / current)
    assert install.winner_key == selection.winner_key and install.sweep_id == tuned["outcome"].sweep_id
    (record,) = installs(tuned)
    assert (record.status, record.version, record.root, record.sweep_id) == ("deployed", current, str(tuned["root"]), tuned["outcome"].sweep_id)
    assert record.median_ms is not None and record.median_ms > 0 and record.at is not None
    assert record.worker["hostname"]


def test_deploy_installs_stored_winners_without_tuning(tuned, capsys):
    other_root = tuned["tmp"] / "second-root"
    with SqliteStore(tuned["store"]) as store:
        sweeps_before = len(store.list_sweeps())
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--root", str(other_root), "--target", "cpu_slots=1")
    assert code == EXIT_OK, lines
    (line,) = lines
    assert line.startswith("deploy: mlp b2 on cpu0") and "verified" in line
    (selection,) = tuned["outcome"].selections
    (entry,) = layout.live(other_root, "mlp")
    assert layout.read_install(entry.folder).winner_key == selection.winner_key
    with SqliteStore(tuned["store"]) as store:
        assert len(store.list_sweeps()) == sweeps_before  # nothing was tuned
        assert store.deployments(tuned["outcome"].sweep_id) == tuned["outcome"].deployments  # its report is unchanged
    code, lines = cli(capsys, "deployments", str(tuned["store"]))
    assert code == EXIT_OK
    assert any(str(other_root) in line and entry.version in line for line in lines)


def test_rollback_switches_back_to_the_previous_version_verified(tuned, capsys):
    folder = batch_folder(tuned["root"])
    first = layout.current_version(folder)
    second = install_runner_up(tuned["spec"], tuned["outcome"], tuned["root"]).name
    assert layout.current_version(folder) == second
    code, lines = cli(capsys, "rollback", str(tuned["store"]), "--root", str(tuned["root"]))
    assert code == EXIT_OK, lines
    assert layout.current_version(folder) == first
    assert layout.versions(folder) == [first, second]  # the newer version is kept
    last = installs(tuned)[-1]
    assert (last.action, last.status, last.version, last.previous) == ("rollback", "deployed", first, second)
    assert last.median_ms is not None
    code, lines = cli(capsys, "rollback", str(tuned["store"]), "--root", str(tuned["root"]))
    assert code == EXIT_INCOMPLETE
    assert lines == [l for l in lines if l.startswith("not done:")] and f"no version before {first}" in lines[0]
    assert layout.current_version(folder) == first


def test_rollback_to_a_version_edited_after_install_is_refused_and_current_stays(tuned, capsys):
    folder = batch_folder(tuned["root"])
    first, second = layout.versions(folder)[:2]
    layout._switch(folder, second)
    weights = folder / first / "checkpoint" / "artifacts" / "weights.pt"
    original = weights.read_bytes()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0xFF
    weights.write_bytes(bytes(edited))
    try:
        code, lines = cli(capsys, "rollback", str(tuned["store"]), "--root", str(tuned["root"]))
        assert code == EXIT_INCOMPLETE
        (line,) = lines
        assert line.startswith("not done: mlp b2 on cpu0") and "weights.pt fails its SHA-256 check" in line
        assert layout.current_version(folder) == second
    finally:
        weights.write_bytes(original)
        layout._switch(folder, first)


# -- bad input: one line each, exit 2, nothing live touched ----------------------------------------


def test_a_store_with_no_sweeps_is_refused(tmp_path):
    SqliteStore(tmp_path / "empty").close()
    from env_helpers import child_env

    env = child_env(ROOT_DIR)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "deploy", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == EXIT_BAD_INPUT
    assert out.stdout.splitlines() == [f"error: store {tmp_path / 'empty'} has no sweeps: run `python -m orchestrator tune SPEC` first"]


def test_an_unknown_model_is_refused(tuned, capsys):
    before, records = snapshot(tuned["root"]), len(installs(tuned))
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--model", "resnet")
    assert code == EXIT_BAD_INPUT
    assert lines == [f"error: unknown model 'resnet': sweep {tuned['outcome'].sweep_id} tuned mlp"]
    assert snapshot(tuned["root"]) == before and len(installs(tuned)) == records


def test_a_target_whose_device_class_has_no_winner_is_refused_listing_the_classes_that_have_one(tuned, capsys):
    (selection,) = tuned["outcome"].selections
    with SqliteStore(tuned["store"]) as store:  # a sweep that tuned only for another device class
        sweep = store.begin_sweep("elsewhere", tuned["spec"].model_dump(mode="json"))
        store.put_selection(sweep, SelectionRecord("mlp", 2, "f" * 64, selection.winner_key, selection.winner, "fastest"))
        store.finish_sweep(sweep, "done")
    before, records = snapshot(tuned["root"]), len(installs(tuned))
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", sweep)
    assert code == EXIT_BAD_INPUT
    (line,) = lines
    assert line.startswith("error: target cpu0 (") and "has no winner for mlp; device classes with one: ? [ffffffffffff]" in line
    assert snapshot(tuned["root"]) == before and len(installs(tuned)) == records


def test_a_deploy_root_that_cannot_be_written_is_refused(tuned, capsys):
    blocker = tuned["tmp"] / "a-file"
    blocker.write_text("")
    before, records = snapshot(tuned["root"]), len(installs(tuned))
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(blocker / "deploy"))
    assert code == EXIT_BAD_INPUT
    assert lines == [f"error: target cpu0: deploy root {blocker / 'deploy'} can't be written: Not a directory"]
    assert snapshot(tuned["root"]) == before and len(installs(tuned)) == records


def test_a_bad_target_is_refused(tuned, capsys):
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--target", "tpus=2")
    assert code == EXIT_BAD_INPUT
    assert lines == ["error: --target 'tpus=2': give one of all_gpus, gpus=N, cpu_slots=N or accelerator_type=NAME"]


def test_deployments_of_a_store_with_no_sweeps_is_refused(tmp_path, capsys):
    SqliteStore(tmp_path / "empty").close()
    code, lines = cli(capsys, "deployments", str(tmp_path / "empty"))
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and "has no sweeps" in lines[0]


def test_serve_and_rollback_refuse_a_store_with_no_sweeps_before_ray(tmp_path, capsys):
    SqliteStore(tmp_path / "empty").close()
    for command in ("serve", "rollback"):
        code, lines = cli(capsys, command, str(tmp_path / "empty"))
        assert code == EXIT_BAD_INPUT
        assert lines == [f"error: store {tmp_path / 'empty'} has no sweeps: run `python -m orchestrator tune SPEC` first"]


# -- issue 32: names and roots that would leave the deploy root, damage, links ------------------------


def test_a_spec_model_name_that_would_leave_the_deploy_root_is_refused_before_ray(tmp_path, capsys):
    import yaml

    names = ["/tmp/x", "../x", "..", "a/b"]
    spec = {"name": "names", "store": str(tmp_path / "store"), "batch_sizes": [1],
            "models": [{"name": n, "factory": "aitune.examples:mlp", "inputs": [{"shape": [16]}]} for n in names]}
    (tmp_path / "names.yaml").write_text(yaml.safe_dump(spec))
    code, lines = cli(capsys, "tune", str(tmp_path / "names.yaml"))
    assert code == EXIT_BAD_INPUT
    assert lines[0] == f"invalid sweep spec {tmp_path / 'names.yaml'}:"
    for i, name in enumerate(names):
        assert f"  models[{i}].name: model name {name!r} can't be a folder of the deploy root: use 1 to 128 letters" in lines[i + 1]
    assert not (tmp_path / "store").exists() and not Path("/tmp/x").exists()


@pytest.mark.parametrize("command", ["deploy", "rollback", "serve"])
def test_an_empty_system_or_file_root_is_refused_before_anything_is_installed(tuned, capsys, monkeypatch, command):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tuned["tmp"] / "xdg"))  # where an empty root used to install
    file = tuned["tmp"] / "a-file-root"
    file.write_text("")
    before, records = snapshot(tuned["root"]), len(installs(tuned))
    for root, words in (("", "deploy root is empty"), ("/", "deploy root / is a system folder"),
                        ("/etc", "deploy root /etc is a system folder"), (str(file), f"deploy root {file} is a file")):
        code, lines = cli(capsys, command, str(tuned["store"]), "--root", root)
        assert code == EXIT_BAD_INPUT, lines
        (line,) = lines
        assert line.startswith(f"error: --root {root!r}: {words}"), line
    assert not (tuned["tmp"] / "xdg").exists()
    assert snapshot(tuned["root"]) == before and len(installs(tuned)) == records


def test_deploy_rewrites_a_damaged_device_class_file_so_load_tuned_loads_again(tuned, capsys):
    import aitune

    root = tuned["tmp"] / "damaged-class-root"
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    class_file = batch_folder(root).parent / layout.DEVICE_CLASS
    class_file.write_bytes(b"")  # what a full disk used to leave
    with pytest.raises(aitune.TunedModelError, match="device_class.json: damaged"):
        aitune.load_tuned(root, "mlp")
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    assert "verified" in lines[0]
    assert aitune.load_tuned(root, "mlp").versions == {2: layout.current_version(batch_folder(root))}


def test_deploy_never_says_verified_about_a_root_load_tuned_refuses(tuned, capsys):
    root = tuned["tmp"] / "unloadable-root"
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    other = batch_folder(root).parent / "b4"  # another batch of the model whose pointer is broken
    other.mkdir()
    (other / layout.CURRENT).write_text("v0001-000000000000\n")
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_INCOMPLETE
    (line,) = lines
    assert line.startswith("not done: mlp b2 on cpu0") and "load_tuned refuses it" in line and f"{other / layout.CURRENT}" in line
    assert "verified" not in line


def test_the_same_checkpoint_deployed_over_a_tampered_install_is_installed_again(tuned, capsys):
    import aitune

    root = tuned["tmp"] / "tampered-root"
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    folder = batch_folder(root)
    first = layout.current_version(folder)
    weights = folder / first / "checkpoint" / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    now = layout.current_version(folder)
    assert now != first and f"{now} current" in lines[0] and "verified" in lines[0]
    assert aitune.load_tuned(root, "mlp").versions == {2: now}


def test_rollback_through_a_linked_model_folder_is_refused_and_writes_nothing_there(tuned, capsys):
    import shutil

    root, elsewhere = tuned["tmp"] / "linked-root", tuned["tmp"] / "elsewhere"
    root.mkdir()
    shutil.copytree(tuned["root"] / "mlp", elsewhere / "mlp")
    for lock in (elsewhere / "mlp").rglob(".lock"):
        lock.unlink()
    (root / "mlp").symlink_to(elsewhere / "mlp")
    before = snapshot(elsewhere)
    code, lines = cli(capsys, "rollback", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_INCOMPLETE
    (line,) = lines
    assert line.startswith("not done: mlp b2 on cpu0") and f"{root / 'mlp'} is a symbolic link" in line
    assert snapshot(elsewhere) == before  # no lock file made through the link


def test_serve_refuses_a_bad_port_a_port_in_use_and_an_empty_root_in_one_line_before_ray(tuned, capsys):
    import socket

    sweep = tuned["outcome"].sweep_id
    code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--port", "70000")
    assert (code, lines) == (EXIT_BAD_INPUT, ["error: --port 70000: give a port from 1 to 65535"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--port", str(port))
    assert code == EXIT_BAD_INPUT
    assert lines == [f"error: --port {port}: can't listen on 127.0.0.1:{port}: Address already in use"]
    empty = tuned["tmp"] / "empty-root"
    code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--root", str(empty))
    assert code == EXIT_BAD_INPUT
    assert lines == [f"error: nothing is installed for mlp in deploy root {empty}: deploy first: "
                     f"python -m orchestrator deploy {tuned['store']}"]
    code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--max-body-mb", "0")
    assert (code, lines) == (EXIT_BAD_INPUT, ["error: --max-body-mb must be a positive number, got 0.0"])
    code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--host", "0.0.0.0", "--port", "70000")
    assert code == EXIT_BAD_INPUT and lines == [
        "warning: --host 0.0.0.0 opens the server beyond this machine; it has no authentication",
        "error: --port 70000: give a port from 1 to 65535"]
    for bad, words in (("fast", "give milliseconds from 0 to 1000"), ("-1", "give milliseconds from 0 to 1000"),
                       ("resnet=3", "'resnet' is not served; served: mlp")):
        code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", sweep, "--max-queue-delay-ms", bad)
        assert code == EXIT_BAD_INPUT and len(lines) == 1 and words in lines[0], lines


def test_rollback_on_a_read_only_root_is_one_line_and_exit_2(tuned, capsys):
    import shutil

    ro = tuned["tmp"] / "read-only-root"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount is the real thing
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("can't mount a tmpfs to make read-only")
    try:
        shutil.copytree(tuned["root"] / "mlp", ro / "mlp")
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        else:
            for p in [ro, *ro.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        before = snapshot(ro)
        code, lines = cli(capsys, "rollback", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(ro))
        assert code == EXIT_BAD_INPUT
        (line,) = lines
        assert line.startswith(f"error: target cpu0: deploy root {ro} can't be written: "), line
        assert snapshot(ro) == before
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
        else:
            for p in [ro, *ro.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)


def test_deployments_reads_the_disk_and_shows_where_it_disagrees_with_the_store(tuned, capsys):
    import shutil

    root = tuned["tmp"] / "disagreeing-root"
    code, lines = cli(capsys, "deploy", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root))
    assert code == EXIT_OK, lines
    folder = batch_folder(root)
    version = layout.current_version(folder)
    code, lines = cli(capsys, "deployments", str(tuned["store"]))
    (mine,) = [l for l in lines if f" in {root}:" in l]
    assert version in mine and "DISAGREES" not in mine
    (batching,) = [l for l in lines if l.startswith("batching of mlp") and f"(deploy root {root})" in l]
    assert batching.endswith(": dynamic batching up to 2 rows as [2]"), batching  # the MLP's rows are independent
    # someone switched current by hand to a copy the store knows nothing of; another batch appeared
    other = f"v0007-{version.split('-')[1]}"
    shutil.copytree(folder / version, folder / other)
    (folder / layout.CURRENT).write_text(other + "\n")
    code, lines = cli(capsys, "deployments", str(tuned["store"]))
    (mine,) = [l for l in lines if f" in {root}:" in l]
    assert mine.endswith(f"; DISAGREES on disk: {other} is current, not {version}")
    shutil.rmtree(folder)
    code, lines = cli(capsys, "deployments", str(tuned["store"]))
    (mine,) = [l for l in lines if f" in {root}:" in l]
    assert mine.endswith(f"; DISAGREES on disk: nothing installed in {folder}")
    shutil.copytree(batch_folder(tuned["root"]), folder.parent / "b8")  # a batch the store never installed here
    code, lines = cli(capsys, "deployments", str(tuned["store"]))
    assert any(f"mlp b8 on " in l and f" in {root}:" in l and "DISAGREES on disk only" in l for l in lines), lines


def test_serve_over_a_version_that_fails_its_checks_says_why_in_one_line(tuned, capsys):
    import shutil

    root = tuned["tmp"] / "serve-damaged-root"
    shutil.copytree(tuned["root"], root)
    folder = batch_folder(root)
    weights = folder / layout.current_version(folder) / "checkpoint" / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    from serve_helpers import free_port

    code, lines = cli(capsys, "serve", str(tuned["store"]), "--sweep", tuned["outcome"].sweep_id, "--root", str(root),
                      "--port", str(free_port()))
    assert code == EXIT_INCOMPLETE, lines
    lines = [l for l in lines if "(raylet)" not in l]  # Ray's own log stream on shutdown, not ours
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("not done: serving mlp failed: mlp b2 version ") and "weights.pt fails its SHA-256 check" in line
    assert "deploy first" not in line
