"""Runs onnx.checker (full check: the schema rules and ONNX's strict shape inference) on each
program given, in one process, for the Rust tests.

    python3 tests/onnx_check.py a.onnx b.onnx ...

Prints one line per file: "ok <path>" or "FAIL <path>: <reason>". Exit code 0 when every file
passes, 1 when one fails, 3 when the onnx package is not installed.
"""
import sys

try:
    import onnx
except ImportError as e:  # the Rust side decides whether that is a skip or a failure
    print(f"onnx unavailable: {e}", file=sys.stderr)
    sys.exit(3)


def main(paths):
    failed = False
    for p in paths:
        try:
            onnx.checker.check_model(p, full_check=True)
            print(f"ok {p}")
        except Exception as e:  # report every file, then fail
            failed = True
            reason = " ".join(str(e).split())
            print(f"FAIL {p}: {type(e).__name__}: {reason}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
