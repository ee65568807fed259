"""Cuddle or Not: serve any fastai image classifier over HTTP."""

__version__ = "1.0.0"
