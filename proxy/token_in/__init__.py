"""Token-in: continuing calls get their trajectory's exact prompt IDs; drift diagnosis for every call."""
