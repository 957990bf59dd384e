"""The data: formats and validation, the check, the token report and the tokenized cache."""
