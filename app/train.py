"""`python -m app.train`: train and export a model (`app.building.train`)."""

from app.building.train import main

if __name__ == "__main__":
    raise SystemExit(main())
