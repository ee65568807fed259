"""Model building, the lesson's loop as commands: downloading and verifying photos, training,
calibration, the detector's fitting, evaluation and cleaning (with its review page).

Uses torch and fastai (through `app.learner` and `app.arch`) and measures every model through
`app.core`, the serving path's own decoding, preprocessing and detector, never copies of them.
"""
