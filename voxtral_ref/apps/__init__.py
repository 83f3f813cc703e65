"""What users run: the CLI, the oracle tools (dump / compare / explain), subtitles."""
