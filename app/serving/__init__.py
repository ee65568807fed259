"""Serving: the Starlette app, its middleware and routes, start-up, the classifier with its
batching inference thread, image fetching and metrics. Runs on `app.core`; imports torch and
fastai only through `app.learner`, and only when a learner is to be loaded."""
