"""An MLServer runtime that serves one ONNX file with onnxruntime (CPU, one thread).

The tests start `mlserver start DIR` with a model-settings.json whose `implementation` is
`mlserver_onnx.OnnxRuntime` and whose `parameters.uri` is the ONNX file; this folder is on
PYTHONPATH. Inputs are decoded by the protocol's own numpy codec, so the answers are the ones any
MLServer client would get.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        # A request the model cannot take is the client's error (400), not the server's.
        try:
            feeds = {i.name: NumpyCodec.decode_input(i) for i in request.inputs}
            results = self._session.run(None, feeds)
        except (ValueError, ort.capi.onnxruntime_pybind11_state.InvalidArgument) as e:
            raise MLServerError(str(e), status_code=400) from e
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)],
        )
