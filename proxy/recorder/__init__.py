"""The recorder process: one per host, it turns the calls the relays hand it into rows (``service``);
the relays reach it through ``link``, and ``keeper`` starts it and starts it again when it dies."""
