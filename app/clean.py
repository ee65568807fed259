"""`python -m app.clean`: rank and review a folder of labelled photos (`app.building.clean`)."""

from app.building.clean import main

if __name__ == "__main__":
    raise SystemExit(main())
