"""An MLServer runtime for ``serve_load.py``: one of ``aitune.examples``' models, eager fp32, 1 thread.

``model-settings.json`` names it ``mlserver_runtime.ExampleModel`` with ``parameters.extra``
``{"factory": "small_cnn", "kwargs": {...}, "threads": 1}``: the factory is called with the
Quick start sweep's kwargs and its default seed, so the weights are those the sweep tuned.
PYTHONPATH must hold this repository (``aitune.examples`` needs only torch).
"""

from __future__ import annotations

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from aitune import examples


class ExampleModel(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        torch.set_num_threads(int(extra.get("threads", 1)))
        factory = getattr(examples, extra["factory"])
        self._model = factory(**extra.get("kwargs", {})).eval()
        self._output = extra.get("output", "output")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.inference_mode():
            out = self._model(x)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._output, out.numpy())])
