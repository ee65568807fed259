"""`python -m app.compile`: compile an export into a checked bundle (`app.building.compile`)."""

from app.building.compile import main

if __name__ == "__main__":
    raise SystemExit(main())
