"""Offline calibration commands (`neuronserve calibrate ...`): each writes a profile (server/profiles.py)."""
