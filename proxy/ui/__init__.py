"""The trajectory viewer: static HTML, CSS and JavaScript served under ``/tokentrail/ui/``.

No build step and nothing fetched at run time: the files in ``static/`` are the whole viewer. The page
reads the trajectory API (``/tokentrail/v1/``) with the key the user typed once, kept in the
browser tab's ``sessionStorage``.
"""
