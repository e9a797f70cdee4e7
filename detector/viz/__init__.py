"""Drawing and writing helpers (plots, the run logger, text tables); they run no model."""
