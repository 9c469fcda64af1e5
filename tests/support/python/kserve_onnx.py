"""KServe's Python model server serving one ONNX file with onnxruntime (CPU, one thread).

    python kserve_onnx.py --model_name NAME --model_file FILE --http_port PORT

plus any of KServe's own server flags. Outputs come back as binary data when the request asks
for it (`parameters.binary_data_output`, or `binary_data` on a requested output), as KServe's
protocol code decides.
"""

import argparse

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.utils.numpy_codec import from_np_dtype


class OnnxModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        try:
            feeds = {i.name: i.as_numpy() for i in payload.inputs}
            results = self._session.run(None, feeds)
        except (ValueError, ort.capi.onnxruntime_pybind11_state.InvalidArgument) as e:
            raise InvalidInput(str(e)) from e
        binary = payload.use_binary_outputs
        outputs = []
        for name, value in zip(self._outputs, results):
            out = InferOutput(name=name, shape=list(value.shape), datatype=from_np_dtype(value.dtype))
            out.set_data_from_numpy(value, binary_data=binary)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_file", required=True)
    args, _ = parser.parse_known_args()
    ModelServer(enable_grpc=False).start([OnnxModel(args.model_name, args.model_file)])
