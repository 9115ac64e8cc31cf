"""The Backend life cycle: every transition, and every wrong-state call with its own message."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from aitune.build_refusal import BuildRefused
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import BackendState, TorchEagerBackend, UnsupportedDeviceError
from aitune_helpers import BuildFailsBackend, CudaOnlyBackend, tiny_linear

NAME = "TorchEagerBackend"
X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
SAMPLE = Sample.of(X)
SPEC = GraphSpec.from_sample(SAMPLE)


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture
def module():
    return tiny_linear()


@pytest.fixture
def built(module, tmp_path):
    return TorchEagerBackend().build(module, SPEC, [SAMPLE], "cpu", tmp_path / "build")


@pytest.fixture
def loaded(built):
    """A backend in CHECKPOINT_LOADED, rebuilt from another one's state dict."""
    backend = TorchEagerBackend.from_dict(built.to_dict())
    assert backend.state is BackendState.CHECKPOINT_LOADED
    return backend


@pytest.fixture
def deployed(loaded):
    loaded.deploy("cpu")
    return loaded


def expected(module):
    with torch.inference_mode():
        return module(X)


# -- transitions -------------------------------------------------------------------------------
def test_new_backend_is_in_init_with_no_device():
    backend = TorchEagerBackend()
    assert backend.state is BackendState.INIT
    assert backend.device is None
    assert not backend.is_active
    assert backend.name == NAME


def test_build_goes_from_init_to_active_on_the_device(built, module):
    assert built.state is BackendState.ACTIVE
    assert built.is_active
    assert built.device == torch.device("cpu")
    assert built.graph_spec == SPEC
    torch.testing.assert_close(built.infer(X), expected(module))


def test_build_returns_the_backend_itself(module, tmp_path):
    backend = TorchEagerBackend()
    assert backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path) is backend


def test_build_twice_raises(built, module):
    with pytest.raises(RuntimeError, match=exactly(f"Backend {NAME} build should be called only once")):
        built.build(module, SPEC, [SAMPLE], "cpu")
    assert built.state is BackendState.ACTIVE


def test_build_twice_raises_even_when_inactive(built, module):
    built.deactivate()
    with pytest.raises(RuntimeError, match=exactly(f"Backend {NAME} build should be called only once")):
        built.build(module, SPEC, [SAMPLE], "cpu")


def test_activate_when_active_is_a_no_op(built, module):
    built.activate()
    assert built.state is BackendState.ACTIVE
    torch.testing.assert_close(built.infer(X), expected(module))


def test_deactivate_goes_to_inactive_and_refuses_inference(built):
    built.deactivate()
    assert built.state is BackendState.INACTIVE
    assert not built.is_active
    with pytest.raises(RuntimeError, match=exactly(f"Cannot run inference, backend {NAME} should be activated first")):
        built.infer(X)


def test_deactivate_when_inactive_is_a_no_op(built):
    built.deactivate()
    built.deactivate()
    assert built.state is BackendState.INACTIVE


def test_inactive_to_active_infers_again(built, module):
    before = built.infer(X)
    built.deactivate()
    built.activate()
    assert built.state is BackendState.ACTIVE
    assert built.is_active
    torch.testing.assert_close(built.infer(X), before)
    torch.testing.assert_close(built.infer(X), expected(module))


def test_checkpoint_loaded_to_active_by_activate(loaded, module):
    assert not loaded.is_active
    loaded.activate()
    assert loaded.state is BackendState.ACTIVE
    assert loaded.device == torch.device("cpu")
    torch.testing.assert_close(loaded.infer(X), expected(module))
    # once active it follows the ordinary cycle
    loaded.deactivate()
    assert loaded.state is BackendState.INACTIVE


def test_checkpoint_loaded_keeps_config_graph_spec_and_device(built, loaded):
    assert loaded.config == built.config
    assert loaded.graph_spec == SPEC
    assert loaded.device == torch.device("cpu")
    assert loaded.key() == built.key()


def test_deploy_goes_from_checkpoint_loaded_to_deployed(loaded, module):
    loaded.deploy("cpu")
    assert loaded.state is BackendState.DEPLOYED
    assert loaded.device == torch.device("cpu")
    torch.testing.assert_close(loaded.infer(X), expected(module))


def test_deploy_none_keeps_the_stored_device(loaded, module):
    stored = loaded.device
    loaded.deploy(None)
    assert loaded.state is BackendState.DEPLOYED
    assert loaded.device == stored == torch.device("cpu")
    torch.testing.assert_close(loaded.infer(X), expected(module))


def test_deploy_none_without_a_stored_device_is_refused(built):
    state = built.to_dict()
    state["device"] = None
    backend = TorchEagerBackend.from_dict(state)
    with pytest.raises(ValueError, match=f"Backend {NAME}: no device given"):
        backend.deploy(None)
    assert backend.state is BackendState.CHECKPOINT_LOADED


# -- wrong states --------------------------------------------------------------------------------
def test_activate_from_init_raises():
    backend = TorchEagerBackend()
    with pytest.raises(RuntimeError, match=exactly(f"Cannot activate backend {NAME}, backend should be built first")):
        backend.activate()
    assert backend.state is BackendState.INIT


def test_activate_from_deployed_raises(deployed):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot activate backend {NAME}, backend is already deployed")):
        deployed.activate()
    assert deployed.state is BackendState.DEPLOYED


def test_deactivate_from_init_raises():
    backend = TorchEagerBackend()
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deactivate backend {NAME}, backend should be built first")):
        backend.deactivate()
    assert backend.state is BackendState.INIT


def test_deactivate_from_deployed_raises(deployed):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deactivate backend {NAME}, backend is already deployed")):
        deployed.deactivate()
    assert deployed.state is BackendState.DEPLOYED
    deployed.infer(X)  # still serving


def test_deactivate_from_checkpoint_loaded_raises(loaded):
    message = f"Cannot deactivate backend {NAME}, backend has already been deployed"
    with pytest.raises(RuntimeError, match=exactly(message)):
        loaded.deactivate()
    assert loaded.state is BackendState.CHECKPOINT_LOADED


@pytest.mark.parametrize("state", ["INIT", "ACTIVE", "INACTIVE", "DEPLOYED"])
def test_deploy_only_from_checkpoint_loaded(state, module, tmp_path):
    backend = TorchEagerBackend()
    if state != "INIT":
        backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    if state == "INACTIVE":
        backend.deactivate()
    if state == "DEPLOYED":
        backend = TorchEagerBackend.from_dict(backend.to_dict())
        backend.deploy("cpu")
    message = f"Cannot deploy backend {NAME}, backend should be loaded from a checkpoint"
    with pytest.raises(RuntimeError, match=exactly(message)):
        backend.deploy("cpu")
    assert backend.state is BackendState[state]


@pytest.mark.parametrize("state", ["INIT", "INACTIVE", "CHECKPOINT_LOADED"])
def test_infer_only_when_active_or_deployed(state, module, tmp_path):
    backend = TorchEagerBackend()
    if state != "INIT":
        backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
        backend.deactivate()
    if state == "CHECKPOINT_LOADED":
        backend = TorchEagerBackend.from_dict(backend.to_dict())
    message = f"Cannot run inference, backend {NAME} should be activated first"
    with pytest.raises(RuntimeError, match=exactly(message)):
        backend.infer(X)
    with pytest.raises(RuntimeError, match=exactly(message)):
        backend(X)  # __call__ is infer


def test_call_is_infer(built, module):
    torch.testing.assert_close(built(X), expected(module))


def test_to_dict_before_build_raises():
    with pytest.raises(RuntimeError, match=exactly(f"Backend {NAME} has nothing to save: it was never built (state INIT)")):
        TorchEagerBackend().to_dict()


# -- devices and failed builds ---------------------------------------------------------------------
def test_build_on_an_unsupported_device_type_raises(module):
    backend = TorchEagerBackend()
    with pytest.raises(UnsupportedDeviceError, match=r"does not support device type 'meta'"):
        backend.build(module, SPEC, [SAMPLE], "meta")
    assert backend.state is BackendState.INIT
    assert backend.device is None


def test_build_of_a_cuda_only_backend_on_cpu_raises(module):
    backend = CudaOnlyBackend()
    with pytest.raises(UnsupportedDeviceError, match=r"CudaOnlyBackend does not support device type 'cpu' \(supported: \['cuda'\]\)"):
        backend.build(module, SPEC, [SAMPLE], "cpu")
    assert backend.state is BackendState.INIT


def test_unsupported_device_error_is_a_runtime_error():
    assert issubclass(UnsupportedDeviceError, RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
def test_build_on_cuda_without_cuda_is_unsupported(module):
    backend = TorchEagerBackend()
    with pytest.raises(UnsupportedDeviceError, match="CUDA is not available"):
        backend.build(module, SPEC, [SAMPLE], "cuda")
    assert backend.state is BackendState.INIT


def test_deploy_on_an_unsupported_device_type_raises(loaded):
    with pytest.raises(UnsupportedDeviceError, match="'meta'"):
        loaded.deploy("meta")
    assert loaded.state is BackendState.CHECKPOINT_LOADED
    loaded.deploy("cpu")  # the refused deploy changed nothing
    assert loaded.state is BackendState.DEPLOYED


def test_failed_build_logs_the_traceback_reraises_and_stays_in_init(module, tmp_path, caplog):
    backend = BuildFailsBackend()
    with caplog.at_level(logging.ERROR, logger="aitune.torch.backend.backend"):
        with pytest.raises(RuntimeError, match=BuildFailsBackend.MESSAGE):
            backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    assert backend.state is BackendState.INIT
    assert not backend.is_active
    assert backend.device is None and backend.graph_spec is None
    records = [r for r in caplog.records if "failed to build" in r.getMessage()]
    assert len(records) == 1
    assert "BuildFailsBackend" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert "Traceback" in caplog.text and BuildFailsBackend.MESSAGE in caplog.text
    with pytest.raises(RuntimeError, match=exactly("Cannot run inference, backend BuildFailsBackend should be activated first")):
        backend.infer(X)


def test_a_refused_build_logs_one_line_without_a_traceback_and_stays_in_init(module, tmp_path, caplog):
    class RefusesBackend(TorchEagerBackend):
        def _build(self, module, graph_spec, data, cache_dir) -> None:
            raise BuildRefused("opset 17 asked for, 18 written: use opset 18")

    backend = RefusesBackend()
    with caplog.at_level(logging.WARNING, logger="aitune.torch.backend.backend"):
        with pytest.raises(BuildRefused, match="use opset 18"):
            backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    assert backend.state is BackendState.INIT and backend.device is None
    records = [r for r in caplog.records if r.name == "aitune.torch.backend.backend"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].exc_info is None and "Traceback" not in caplog.text
    assert "RefusesBackend can't build on cpu: opset 17 asked for, 18 written: use opset 18" in records[0].getMessage()


def test_config_of_the_wrong_class_is_refused():
    from aitune.torch.backend import OnnxRuntimeConfig

    with pytest.raises(TypeError, match="TorchEagerBackend needs a TorchEagerConfig, got OnnxRuntimeConfig"):
        TorchEagerBackend(OnnxRuntimeConfig())


def test_describe_names_the_backend_and_its_changed_fields():
    from aitune.torch.backend import TorchEagerConfig

    assert TorchEagerBackend().describe() == "TorchEagerBackend(defaults)"
    assert TorchEagerBackend(TorchEagerConfig(precision="bf16")).describe() == "TorchEagerBackend(precision=bfloat16)"
    assert TorchEagerBackend(TorchEagerConfig(precision="bf16", channels_last=True)).describe() == (
        "TorchEagerBackend(precision=bfloat16,channels_last=True)"
    )
