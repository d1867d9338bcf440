"""Data files shipped with the app: icons, the default model manifest, small data."""
