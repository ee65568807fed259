"""`python -m app.evaluate`: measure a model the way the server runs it (`app.building.evaluate`)."""

from app.building.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
