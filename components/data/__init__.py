"""Bring-your-own data: prompt datasets read into the prompts artifact."""
