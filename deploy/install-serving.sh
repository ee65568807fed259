#!/bin/sh
# Install what serving a bundle needs (requirements-serve.txt) and leave out what the server never
# loads. Run by both images that serve a bundle (Dockerfile's default stage, Dockerfile.vercel),
# from the folder holding requirements-serve.txt.
#
# Left out (tests/test_bundle.py checks, in a serving process's memory map and with the packages
# made unimportable, that none of it is loaded): test suites, headers and stubs; the model-building
# parts of ONNX Runtime (transformers, quantization, tools) and the packages only model conversion
# imports (protobuf, flatbuffers); libonnxruntime.so, the C API library (34 MB: the Python module
# carries its own copy of the runtime); NumPy's f2py; and Pillow's text rendering (ImageFont's
# _imagingft and the FreeType, HarfBuzz, PNG and Brotli libraries only it links). About 75 MB in all.
set -eu
pip install --no-cache-dir -r requirements-serve.txt
pip uninstall --yes --no-cache-dir protobuf flatbuffers
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site"/numpy/tests "$site"/numpy/*/tests "$site"/numpy/f2py "$site"/numpy/_core/include \
    "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/onnxruntime/tools \
    "$site"/onnxruntime/datasets "$site"/onnxruntime/capi/libonnxruntime.so* \
    "$site"/PIL/_imagingft.* "$site"/pillow.libs/libfreetype-* "$site"/pillow.libs/libharfbuzz-* \
    "$site"/pillow.libs/libpng16-* "$site"/pillow.libs/libbrotli*
find "$site" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.h' \) -delete
