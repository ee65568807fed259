"""The torch side that serving and model building share: loading an exported fastai learner,
reading its preprocessing, compiling it to ONNX and checking the compiled copy against it.

torch and fastai are imported inside the functions that need them, never when a module here is
imported: the server imports this package at start-up and only pays for torch when it actually
loads a learner (and runs without torch installed when it never does).
"""
