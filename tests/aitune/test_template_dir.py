"""ONNX translations kept on disk: used by other processes, and refused when what was read back is wrong."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.onnx_export import export_onnx
from aitune.torch.onnx_refit import ExportTemplates
from aitune.torch.template_dir import ENV, TemplateDir, default_root, toolchain_tag
from aitune_helpers import needs_onnx_export, tiny_mlp

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _onnx():
    needs_onnx_export()


def sample() -> Sample:
    return Sample((torch.randn(2, 16, generator=torch.Generator().manual_seed(3)),), {})


def export(module, path, templates):
    s = sample()
    return export_onnx(module, GraphSpec.from_sample(s), s, path, None, templates)


def run_onnx(made):
    import onnxruntime as ort

    session = ort.InferenceSession(str(made.model), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: sample().args[0].numpy()})[0])


def assert_runs_its_own_weights(made, module):
    torch.testing.assert_close(run_onnx(made), module(*sample().args).detach(), rtol=1e-4, atol=1e-5)


def kept_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.onnx"))


def test_a_translation_written_by_another_process_is_filled_with_this_models_weights(tmp_path):
    root = tmp_path / "templates"
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from aitune_helpers import tiny_mlp\n"
            "from test_template_dir import export\n"
            "from aitune.torch.onnx_refit import ExportTemplates\n"
            "from aitune.torch.template_dir import TemplateDir\n"
            "t = ExportTemplates(disk=TemplateDir(sys.argv[3]))\n"
            "export(tiny_mlp(seed=0), sys.argv[4], t)\n"
            "assert (t.misses, t.hits, t.disk.saves) == (1, 0, 1)\n")
    repo = HERE.parent.parent
    subprocess.run([sys.executable, "-c", code, str(repo), str(HERE), str(root), str(tmp_path / "first.onnx")],
                   check=True, timeout=300)
    (kept,) = kept_files(root)
    assert kept.parent.name == toolchain_tag()

    templates = ExportTemplates(disk=TemplateDir(root))  # this process has translated nothing
    tuned = tiny_mlp(seed=1)
    made = export(tuned, tmp_path / "b.onnx", templates)
    assert (templates.misses, templates.hits, templates.disk_hits) == (0, 1, 1)
    assert_runs_its_own_weights(made, tuned)
    assert not torch.allclose(run_onnx(made), tiny_mlp(seed=0)(*sample().args).detach())
    # the file holds the graph, not the first model's weights, and names no file beside it
    import onnx

    on_disk = onnx.load(str(kept), load_external_data=False)
    assert len(on_disk.graph.initializer) == 0 and len(on_disk.graph.node) > 0
    assert not (kept.parent / (kept.name + ".data")).exists()


def test_the_next_export_in_the_process_uses_the_template_read_back_without_reading_again(tmp_path):
    disk = TemplateDir(tmp_path)
    export(tiny_mlp(seed=0), tmp_path / "a.onnx", ExportTemplates(disk=disk))
    templates = ExportTemplates(disk=disk)
    for seed in (1, 2):
        module = tiny_mlp(seed=seed)
        assert_runs_its_own_weights(export(module, tmp_path / f"{seed}.onnx", templates), module)
    assert (templates.hits, templates.disk_hits, disk.loads) == (2, 1, 1)


def damage_garbage(path: Path) -> None:
    path.write_bytes(b"\x08\x07 this is not an onnx model \xff\xfe" * 3)


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit(path: Path, change) -> None:
    import onnx_ir as ir

    model = ir.load(str(path))
    change(model)
    ir.save(model, str(path))


def damage_other_form(path: Path) -> None:
    _edit(path, lambda m: m.metadata_props.update({"aitune.template.form": "0" * 64}))


def damage_weights_list(path: Path) -> None:
    _edit(path, lambda m: m.metadata_props.update({"aitune.template.weights": "not.a.weight"}))


def damage_holds_weights(path: Path) -> None:
    import numpy as np
    import onnx_ir as ir

    def change(model):
        value = model.graph.inputs.pop()
        value.const_value = ir.tensor(np.zeros([int(d) for d in value.shape], dtype=np.float32), name=value.name)
        model.graph.initializers.add(value)
        names = model.metadata_props["aitune.template.weights"].split("\n")
        model.metadata_props["aitune.template.weights"] = "\n".join(names[:-1])

    _edit(path, change)


def damage_external_data(path: Path) -> None:
    import onnx_ir as ir

    def change(model):
        node = next(iter(model.graph))
        node.attributes["stolen"] = ir.Attr("stolen", ir.AttributeType.TENSOR, ir.ExternalTensor(
            "/etc/passwd", offset=0, length=16, dtype=ir.DataType.UINT8, shape=ir.Shape([16]), name="stolen"))

    _edit(path, change)


def damage_dangling_value(path: Path) -> None:
    """A weight dropped from the file: a node uses a value nothing defines."""
    def change(model):
        model.graph.inputs.pop()
        names = model.metadata_props["aitune.template.weights"].split("\n")
        model.metadata_props["aitune.template.weights"] = "\n".join(names[:-1])

    _edit(path, change)


def damage_renamed_weight(path: Path) -> None:
    """Sound on its own, but with a weight the program does not have: it can't be filled."""
    def change(model):
        model.graph.inputs[-1].name = "renamed.weight"
        names = model.metadata_props["aitune.template.weights"].split("\n")
        model.metadata_props["aitune.template.weights"] = "\n".join(names[:-1] + ["renamed.weight"])

    _edit(path, change)


@pytest.mark.parametrize("damage", [damage_garbage, damage_truncate, damage_other_form, damage_weights_list,
                                    damage_holds_weights, damage_external_data, damage_dangling_value,
                                    damage_renamed_weight])
def test_a_damaged_or_edited_template_is_not_used_and_the_program_is_translated_again(tmp_path, damage, caplog):
    root = tmp_path / "templates"
    export(tiny_mlp(seed=0), tmp_path / "a.onnx", ExportTemplates(disk=TemplateDir(root)))
    (kept,) = kept_files(root)
    damage(kept)

    disk = TemplateDir(root)
    templates = ExportTemplates(disk=disk)
    tuned = tiny_mlp(seed=1)
    with caplog.at_level(logging.WARNING, logger="aitune.torch.template_dir"):
        made = export(tuned, tmp_path / "b.onnx", templates)
    assert templates.disk_hits == 0 and templates.misses == 1  # translated here
    assert_runs_its_own_weights(made, tuned)
    if damage is damage_renamed_weight:  # read back, but the program would leave it unfilled
        assert disk.loads == 1 and disk.rejected == 0
    else:
        assert disk.rejected == 1 and disk.loads == 0
        assert any(str(kept) in r.getMessage() and "translated again" in r.getMessage() for r in caplog.records)
    # the translation made here took the damaged file's place, and the next process uses it
    after = ExportTemplates(disk=TemplateDir(root))
    export(tiny_mlp(seed=2), tmp_path / "c.onnx", after)
    assert after.disk_hits == 1


def test_a_folder_that_cant_be_written_costs_the_speed_up_not_the_export(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder would go")
    disk = TemplateDir(blocker / "templates")
    templates = ExportTemplates(disk=disk)
    with caplog.at_level(logging.WARNING, logger="aitune.torch.template_dir"):
        for seed in (0, 1):
            module = tiny_mlp(seed=seed)
            assert_runs_its_own_weights(export(module, tmp_path / f"{seed}.onnx", templates), module)
    assert disk.saves == 0 and templates.hits == 1  # still shared within the process
    assert len([r for r in caplog.records if "can't be kept" in r.getMessage()]) == 1


def test_the_folder_keeps_at_most_its_bound_least_recently_used_first_out(tmp_path):
    disk = TemplateDir(tmp_path / "templates")
    templates = ExportTemplates(disk=disk)
    for width in (8, 12, 16):  # three graphs: three templates
        s = Sample((torch.randn(2, width),), {})
        export_onnx(tiny_mlp(width=width), GraphSpec.from_sample(s), s, tmp_path / f"{width}.onnx", None, templates)
    files = kept_files(tmp_path / "templates")
    assert len(files) == 3 and disk.saves == 3
    for age, f in enumerate(files):  # used in the order listed
        os.utime(f, (1_000_000 + age, 1_000_000 + age))
    disk.limit_bytes = sum(f.stat().st_size for f in files[1:])  # room for two
    disk._prune(keep=files[2])
    assert kept_files(tmp_path / "templates") == files[1:]
    disk.limit_bytes = 1  # room for none: the one just written stays
    disk._prune(keep=files[1])
    assert kept_files(tmp_path / "templates") == [files[1]]


def test_where_the_folder_is_and_how_to_turn_it_off(tmp_path):
    assert default_root({ENV: "off"}) is None and default_root({ENV: "0"}) is None
    assert TemplateDir.from_env({ENV: "OFF"}) is None
    assert default_root({ENV: str(tmp_path / "t")}) == tmp_path / "t"
    assert default_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "aitune" / "onnx-templates"
    assert default_root({}) == Path.home() / ".cache" / "aitune" / "onnx-templates"
    # the test session keeps its own folder, not the user's
    assert Path(os.environ[ENV]).name.startswith("aitune-test-templates-")


def _encoder_at_opset_17(seed, path, templates):
    from aitune.examples import small_encoder

    s = Sample((torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)),), {})
    return export_onnx(small_encoder(dim=32, layers=1, seed=seed), GraphSpec.from_sample(s), s, path, 17, templates)


def test_a_graph_the_exporter_could_not_make_as_asked_is_refused_at_once_by_the_next_process(tmp_path, monkeypatch):
    from torch.onnx._internal.exporter import _core

    from aitune.build_refusal import BuildRefused

    translations = []
    real = _core.export
    monkeypatch.setattr(_core, "export", lambda *a, **k: translations.append(1) or real(*a, **k))
    root = tmp_path / "templates"
    with pytest.raises(BuildRefused, match="not the 17 asked for") as first:
        _encoder_at_opset_17(0, tmp_path / "a.onnx", ExportTemplates(disk=TemplateDir(root)))
    (kept,) = root.glob("*/*.refused.json")
    assert len(translations) == 1

    # a fresh process (fresh templates, the same folder), another fine-tune of that graph
    with pytest.raises(BuildRefused) as again:
        _encoder_at_opset_17(1, tmp_path / "b.onnx", ExportTemplates(disk=TemplateDir(root)))
    assert len(translations) == 1  # refused without translating
    assert str(again.value).startswith(str(first.value)) and str(kept) in str(again.value)
    assert "delete it to try again" in str(again.value)

    kept.unlink()  # as the message says: tried again
    with pytest.raises(BuildRefused):
        _encoder_at_opset_17(2, tmp_path / "c.onnx", ExportTemplates(disk=TemplateDir(root)))
    assert len(translations) == 2


@pytest.mark.parametrize("text", ["{not json", '{"form": "0", "toolchain": "x", "why": "made up"}', '["a list"]'])
def test_a_damaged_or_edited_refusal_is_not_believed(tmp_path, text, caplog):
    from aitune.build_refusal import BuildRefused

    root = tmp_path / "templates"
    with pytest.raises(BuildRefused):
        _encoder_at_opset_17(0, tmp_path / "a.onnx", ExportTemplates(disk=TemplateDir(root)))
    (kept,) = root.glob("*/*.refused.json")
    kept.write_text(text)
    disk = TemplateDir(root)
    with caplog.at_level(logging.WARNING, logger="aitune.torch.template_dir"):
        with pytest.raises(BuildRefused) as err:  # tried again, and refused for its own reason
            _encoder_at_opset_17(1, tmp_path / "b.onnx", ExportTemplates(disk=disk))
    assert disk.rejected == 1 and "made up" not in str(err.value) and "earlier export" not in str(err.value)
    assert kept.exists() and "made up" not in kept.read_text()  # written again by this export
