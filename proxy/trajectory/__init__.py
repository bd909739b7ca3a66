"""What TokenTrail knows of a trajectory, in one place: its recent calls (``memory``: this process's,
checked against the database), whether a request continues one of them (``continuation``: by
meaning, not bytes), and how a call's prompt relates to them (``drift``). The token-in planner reads
it on the request path, the writer when it judges and stores a call."""
