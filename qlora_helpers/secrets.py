"""Where the Hugging Face token comes from, in one place, so no other module handles it differently.

The token is looked up only when something is about to be pushed, is returned to the caller and
nothing else: never printed, logged, written to a file, or put into an error message.
"""
from __future__ import annotations

import os

TOKEN_NAME = "HF_TOKEN"  # the environment variable and the Kaggle secret's label

HOW_TO_PROVIDE = (f"set the environment variable {TOKEN_NAME}, or on Kaggle add a secret labelled {TOKEN_NAME} "
                  "(Add-ons > Secrets) and tick it for this notebook")


def hf_token() -> str | None:
    """The Hugging Face token from $HF_TOKEN, else from Kaggle Secrets when running on Kaggle; None if neither.

    Kaggle's client raises when the secret is missing or not attached to the notebook; that is the
    same as no token here (the caller says how to provide one), and its message is not passed on.
    """
    token = os.environ.get(TOKEN_NAME, "").strip()
    if token:
        return token
    try:
        from kaggle_secrets import UserSecretsClient  # only importable inside a Kaggle notebook
    except ImportError:
        return None
    try:
        token = (UserSecretsClient().get_secret(TOKEN_NAME) or "").strip()
    except Exception:  # noqa: BLE001 - any failure means "no token"; its text might echo the request
        return None
    return token or None
