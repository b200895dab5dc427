"""The channel process: one OS process per channel running its transport and actors."""
