"""`python -m app.predict`: classify many photos as the server would (`app.building.predict`)."""

from app.building.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
