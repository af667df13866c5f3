"""Runs one ONNX program in stock ONNX Runtime (CPU) for the Rust tests, and checks it with
onnx.checker (full check).

    python3 tests/ort_run.py request.json response.json

request: {"model": path, "inputs": {name: {"dtype": "f32"|"f64"|"i64", "shape": [...],
"data": [...]}}}; response: {"outputs": [{"name", "shape", "data"}, ...] in graph order,
"checker": "ok" | error text}. Exit code 3 when onnxruntime is not installed.
"""
import json
import sys

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:  # the Rust side decides whether that is a skip or a failure
    print(f"onnxruntime unavailable: {e}", file=sys.stderr)
    sys.exit(3)

DTYPES = {"f32": np.float32, "f64": np.float64, "i64": np.int64}


def main(req_path, resp_path):
    with open(req_path) as f:
        req = json.load(f)
    checker = "onnx not installed"
    try:
        import onnx

        onnx.checker.check_model(req["model"], full_check=True)
        checker = "ok"
    except ImportError:
        pass
    except Exception as e:  # report, the test asserts on it
        checker = f"{type(e).__name__}: {e}"
    feeds = {
        name: np.asarray(t["data"], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
        for name, t in req["inputs"].items()
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(req["model"], opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, feeds)
    resp = {
        "checker": checker,
        "outputs": [
            {"name": n, "shape": list(o.shape), "data": np.asarray(o, dtype=np.float64).ravel().tolist()}
            for n, o in zip(names, outs)
        ],
    }
    with open(resp_path, "w") as f:
        json.dump(resp, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
