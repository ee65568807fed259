"""The runtime core: untrusted bytes to an answer with ONNX Runtime, Pillow and NumPy alone.

Nothing here imports torch, fastai or Starlette, or any other package of this project: serving
runs on it without torch installed, and model building measures its models through it.
"""
