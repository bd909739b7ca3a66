"""Deliberate bugs on the recording path, each of which the test suite must catch: the mutation lane.

Why: a suite can be green and still miss the bug it claims to guard against (two audits planted
plausible bugs and found 6, then 10, that no test saw). Each mutation below is one plausible bug,
written as an exact text replacement in one file of the modules that decide what is recorded; the
script applies it, runs the few tests named for it (without the real vLLM or the browser), restores
the file, and reports whether the tests failed (caught) or passed (MISSED).

    .venv/bin/python bench/mutations.py                  # the whole lane (about 9 minutes on 2 cores)
    .venv/bin/python bench/mutations.py --check          # every mutation still applies; runs no test
    .venv/bin/python bench/mutations.py --list           # names, files, what each bug is
    .venv/bin/python bench/mutations.py token-in-tail stale-gauges-added   # some of them
    .venv/bin/python bench/mutations.py --module proxy/recording/writer.py  # one module's

It cannot go stale silently: a mutation whose target text is not in its file exactly once, or that
names a test file or test that does not exist, is an ERROR (``STALE``), never a skip, and makes the
run exit non-zero. ``--check`` checks exactly that in a fraction of a second, and
``tests/test_mutation_catalogue.py`` runs the same check in the README's test command, so CI fails the
moment code moves under a mutation. The run exits non-zero when any mutation is missed or stale, or
when fewer than ``BAR`` (95%) of the planted bugs are caught. Each distinct set of tests is first run
once with no bug planted: a set that fails then (a missing PostgreSQL, a flaky test) would "catch"
every bug, so its mutations count as ``BROKEN``, not caught (``--no-baseline`` skips this).

It edits files of the working tree in place (the strict editable install imports them from there),
with ``PYTHONDONTWRITEBYTECODE`` so no mutated bytecode is left behind, and restores each file in
``finally``; it refuses to touch a file with uncommitted changes.

Dropped as equivalent (the behaviour is the same, only slower): ``predecessor-not-waited-for`` (a
call no longer waits for the open call it continues: since the token-in planner reads the database
again until the reply is there, and memory takes the finished call first, it finds the same base one
poll later) and ``spool-loses-prompt-text`` (every path to the spool parses the prompt before).

Why this script and not mutmut or cosmic-ray (not tried; an estimate from this lane's own figures):
those generate an operator mutant for nearly every comparison, constant and call of a module
(hundreds for ``writer.py`` alone) and run the test command for each, while one run of the tests
here, which start uvicorn, PostgreSQL and fake upstreams over real sockets, takes 3 to 40 s
(measured per mutation below): one module's mutants would take hours. Hand-written plausible bugs,
each with the few tests that guard it, run in minutes and say what each bug means.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAR = 0.95  # the share of planted bugs the tests must catch
TIMEOUT_S = 300.0  # one mutation's tests; a hang counts as caught (CI would time out), and says so


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must be in the file exactly once
    new: str
    tests: tuple[str, ...]  # test files or node ids (file::test), without the vllm or browser marks
    what: str  # the bug, in one line


MUTATIONS = [
    # ---- proxy/recording/capture.py: what vLLM's answer says, and whether to trust it ----
    Mutation(
        "integrity-always-ok",
        "proxy/recording/capture.py",
        'return ",".join(found) if found else Integrity.OK',
        "return Integrity.OK",
        ("tests/test_capture.py",),
        "every record judged ok, whatever vLLM's usage says",
    ),
    Mutation(
        "completion-count-unchecked",
        "proxy/recording/capture.py",
        "if generated != record.completion_tokens:",
        "if False:",
        ("tests/test_capture.py",),
        "generated IDs that do not match usage.completion_tokens pass",
    ),
    Mutation(
        "completion-count-one-sided",
        "proxy/recording/capture.py",
        "if generated != record.completion_tokens:",
        "if generated < (record.completion_tokens or 0):",
        ("tests/test_capture.py::test_ids_that_disagree_with_vllms_usage_are_flagged",),
        "only fewer generated IDs than usage counts are flagged, never more",
    ),
    Mutation(
        "prompt-count-unchecked",
        "proxy/recording/capture.py",
        "elif self._prompt_count() != record.prompt_tokens:",
        "elif False:",
        ("tests/test_capture.py",),
        "prompt IDs that do not match usage.prompt_tokens pass",
    ),
    Mutation(
        "logprobs-dropped",
        "proxy/recording/capture.py",
        "            choice.logprobs.extend(entries)",
        "            pass",
        ("tests/test_capture.py",),
        "logprobs are not kept",
    ),
    Mutation(
        "logprobs-count-unchecked",
        "proxy/recording/capture.py",
        "c.logprobs is None or len(c.logprobs) != len(c.token_ids)",
        "c.logprobs is None",
        ("tests/test_capture.py::test_logprobs_that_are_not_one_per_token_are_flagged",),
        "logprobs that are not one per generated token pass the integrity check",
    ),
    Mutation(
        "flag-added-judged-unasked",
        "proxy/recording/capture.py",
        "if not self.ask.token_ids and not self.ask.flag_added:",
        "if not self.ask.token_ids:",
        ("tests/test_capture.py",),
        "a call whose IDs the proxy asked for is judged no_token_ids and never checked",
    ),
    Mutation(
        "flag-added-to-echo",
        "proxy/recording/capture.py",
        'add_flag = not asked_ids and not parsed.get("echo")',
        "add_flag = not asked_ids",
        ("tests/test_capture.py::test_completion_echo_is_not_given_the_flag",),
        "an echo completion gets return_token_ids, which changes vLLM's answer to it",
    ),
    Mutation(
        "secrets-stored",
        "proxy/recording/capture.py",
        '_SECRET_KEYS = frozenset({"api_key", "apikey", "authorization"})',
        "_SECRET_KEYS: frozenset[str] = frozenset()",
        ("tests/test_capture.py::test_prepare_request_adds_the_flag_and_remembers_the_ask",),
        "an api_key in the request body is stored in the database",
    ),
    Mutation(
        "flag-only-chunks-kept",
        "proxy/recording/capture.py",
        "return not (self.strip and capture.chat and _is_flag_only_chunk(obj))",
        "return True",
        ("tests/test_capture.py",),
        "a client gets the empty chunks vLLM sends only because of the added flag",
    ),
    Mutation(
        "completion-prompts-per-choice",
        "proxy/recording/capture.py",
        "for index, ids in self._completion_prompts.items() if index % n == 0)",
        "for index, ids in self._completion_prompts.items())",
        ("tests/test_capture.py",),
        "an n>1 completion's prompt is counted once per choice and judged a mismatch",
    ),
    # ---- proxy/relay/: what crosses the proxy and when a request is sent ----
    Mutation(
        "strip-stream",
        "proxy/relay/recorded_call.py",
        "StreamTap(None if self.raw else self.capture, self.strip, chat=self.capture.chat)",
        "StreamTap(None if self.raw else self.capture, False, chat=self.capture.chat)",
        (
            "tests/test_relay_fake.py::test_a_client_that_did_not_ask_for_token_ids_gets_the_bytes_vllm_sends_without_the_flag",
        ),
        "a stream keeps the token IDs the client did not ask for",
    ),
    Mutation(
        "strip-body",
        "proxy/relay/recorded_call.py",
        "body = strip_token_ids(body)",
        "body = body",
        (
            "tests/test_relay_fake.py::test_a_client_that_did_not_ask_for_token_ids_gets_the_bytes_vllm_sends_without_the_flag",
        ),
        "a JSON answer keeps the token IDs the client did not ask for",
    ),
    Mutation(
        "token-in-resent-after-5xx",
        "proxy/relay/recorded_call.py",
        "if 400 <= response.status_code < 500:",
        "if 400 <= response.status_code < 600:",
        ("tests/test_token_in.py",),
        "a token-in call vLLM answered with a 5xx (it may have run it) is sent again",
    ),
    Mutation(
        "flag-error-always-resent",
        "proxy/relay/recorded_call.py",
        "        if not any(marker in body for marker in _FLAG_SHAPED):\n            return response, body\n",
        "",
        (
            "tests/test_relay_hardening.py::test_a_400_that_does_not_mention_the_flag_is_relayed_without_sending_again",
        ),
        "any 400/422 is sent again without the added flag, even one the flag cannot have shaped",
    ),
    Mutation(
        "flag-error-never-resent",
        "proxy/relay/recorded_call.py",
        "if not self.strip or response.status_code not in _VALIDATION_STATUSES:",
        "if True:",
        (
            "tests/test_relay_hardening.py::test_a_400_that_mentions_the_flag_is_answered_for_the_clients_own_request",
        ),
        "a client gets vLLM's error about a return_token_ids flag it never sent",
    ),
    Mutation(
        "sealed-outcome-changed",
        "proxy/relay/recorded_call.py",
        "        if self.sealed:\n            return\n        self.record.outcome = outcome",
        "        self.record.outcome = outcome",
        ("tests/test_relay_hardening.py::test_durable_records_keep_the_outcome_they_were_handed_over_with",),
        "a record's outcome is changed after it was handed to the writer",
    ),
    Mutation(
        "local-connect-error-marks-down",
        "proxy/relay/call.py",
        "            if exc.local:\n                raise\n",
        "",
        ("tests/test_relay_hardening.py::test_a_local_connect_error_does_not_mark_an_upstream_down",),
        "this machine running out of sockets marks a healthy upstream down",
    ),
    Mutation(
        "own-headers-forwarded",
        "proxy/relay/headers.py",
        "if not name.startswith(OWN_HEADER_PREFIXES)",
        "if name",
        ("tests/test_relay_fake.py::test_passthrough_keeps_method_path_query_body_and_drops_hop_by_hop",),
        "X-Trajectory-* and X-TokenTrail-* headers leak to vLLM",
    ),
    Mutation(
        "hop-by-hop-forwarded",
        "proxy/relay/headers.py",
        "if lower in HOP_BY_HOP or lower in nominated or lower in drop:",
        "if lower in drop:",
        ("tests/test_relay_fake.py::test_passthrough_keeps_method_path_query_body_and_drops_hop_by_hop",),
        "hop-by-hop headers (Proxy-Authorization, Connection) are forwarded",
    ),
    Mutation(
        "failover-after-send",
        "proxy/relay/call.py",
        "        except UpstreamConnectError as exc:  # nothing was sent: another upstream may take the call",
        "        except UpstreamError as exc:  # nothing was sent: another upstream may take the call",
        ("tests/test_no_duplicate_requests.py", "tests/test_upstreams.py"),
        "a call that failed after it was sent moves to another upstream: sent twice",
    ),
    Mutation(
        "body-limit-unenforced",
        "proxy/relay/request_body.py",
        "        if size > limit:\n",
        "        if False:\n",
        (
            "tests/test_limits_and_fuzz.py::test_a_body_over_the_limit_gets_413_whether_its_length_is_announced_or_not",
        ),
        "a chunked body over TOKENTRAIL_MAX_BODY_BYTES is read whole",
    ),
    Mutation(
        "non-idempotent-passthrough-resent",
        "proxy/relay/passthrough.py",
        "resend_if_stale=method in IDEMPOTENT_METHODS,",
        "resend_if_stale=True,",
        ("tests/test_no_duplicate_requests.py",),
        "a POST pass-through is sent again on a stale connection",
    ),
    # ---- proxy/upstream/client.py: never re-send a request vLLM may have run ----
    Mutation(
        "resend-ignores-caller",
        "proxy/upstream/client.py",
        "            if not resend_if_stale:\n                raise\n",
        "            pass\n",
        ("tests/test_no_duplicate_requests.py",),
        "a request the caller said must not be re-sent is re-sent on a stale connection",
    ),
    Mutation(
        "late-close-taken-for-stale",
        "proxy/upstream/connection.py",
        "            if reused and (self.writing_paused or early):",
        "            if reused:",
        (
            "tests/test_no_duplicate_requests.py::test_a_post_dropped_on_a_reused_connection_after_work_is_not_sent_again",
        ),
        "a reused connection closed after vLLM may have run the request is re-sent as stale",
    ),
    # ---- proxy/server/uvicorn_hooks.py ----
    Mutation(
        "backpressure-ignored",
        "proxy/server/uvicorn_hooks.py",
        "        return not self._flow.write_paused",
        "        return True",
        (
            "tests/test_relay_fake.py::test_a_slow_stream_reader_pauses_the_upstream_and_still_gets_every_byte",
        ),
        "the relay never pauses the upstream for a slow client",
    ),
    # ---- proxy/recording/writer.py: nothing lost, nothing written twice, seq without gaps ----
    Mutation(
        "replay-duplicates",
        "proxy/recording/writer.py",
        "todo = [(record, line) for record, line in chunk if record.call_id not in present]",
        "todo = [(record, line) for record, line in chunk]",
        ("tests/test_writer.py", "tests/test_outage.py"),
        "a replay writes calls the database already holds again",
    ),
    Mutation(
        "queue-full-drops",
        "proxy/recording/writer.py",
        '            self._spill([record], "queue_full")',
        "            pass",
        ("tests/test_writer.py",),
        "a record that finds the queue full is dropped silently",
    ),
    Mutation(
        "ordinal-stuck",
        "proxy/recording/writer.py",
        "            self._ordinals[trajectory_id] = ordinal + 1",
        "            self._ordinals[trajectory_id] = ordinal",
        (
            "tests/test_relay_fake.py::test_200_concurrent_calls_over_20_trajectories_give_200_rows_and_gapless_seq",
        ),
        "concurrent calls of a trajectory get the same arrival ordinal",
    ),
    Mutation(
        "held-not-flushed-at-stop",
        "proxy/recording/writer.py",
        "ready = self._in_arrival_order(batch, flush=stopping, touched=skipped)",
        "ready = self._in_arrival_order(batch, flush=False, touched=skipped)",
        ("tests/test_writer.py::test_a_record_held_for_its_predecessor_is_written_when_the_writer_stops",),
        "records held for an earlier-arrived call are never written when the writer stops",
    ),
    Mutation(
        "spilled-ordinal-waited-for",
        "proxy/recording/writer.py",
        "                elif self._take_skipped(trajectory_id, expected):\n                    pass\n",
        "",
        ("tests/test_writer.py::test_a_call_after_one_that_spilled_is_written_without_waiting_for_it",),
        "after a record spills, its trajectory's later records wait for it forever",
    ),
    Mutation(
        "seq-reused-after-restart",
        "proxy/recording/writer.py",
        "            found[trajectory_id] = top + 1",
        "            found[trajectory_id] = top",
        ("tests/test_writer.py::test_seq_continues_where_the_database_left_off_after_a_restart",),
        "a restarted writer numbers a trajectory's next call with the last seq again",
    ),
    Mutation(
        "call-count-overwritten",
        "proxy/recording/writer.py",
        '"call_count = trajectories.call_count + excluded.call_count, "',
        '"call_count = excluded.call_count, "',
        ("tests/test_writer.py", "tests/test_api.py"),
        "a trajectory's call_count is the last batch's, not the sum",
    ),
    Mutation(
        "refused-records-replayed",
        "proxy/recording/writer.py",
        "                elif reason.startswith(REFUSED):",
        "                elif False:",
        (
            "tests/test_writer.py::test_a_record_the_database_refuses_is_set_aside_and_does_not_block_the_replay",
            "tests/test_writer.py::test_a_refused_record_is_set_aside_by_the_idle_replay_too",
        ),
        "records the database refused on their own are replayed again and again",
    ),
    Mutation(
        "spool-never-replayed",
        "proxy/recording/writer.py",
        "if not self._spool.pending or time.monotonic() - self._last_replay < _REPLAY_EVERY_S:",
        "if True:",
        ("tests/test_outage.py::test_a_locked_database_spools_the_records_and_replays_them_exactly_once",),
        "spooled records are never written to the database",
    ),
    Mutation(
        "tokens-summed-wrong",
        "proxy/recording/writer.py",
        'row["completion_tokens"] += record.completion_tokens or 0',
        'row["completion_tokens"] += record.prompt_tokens or 0',
        ("tests/test_api.py::test_tags_from_the_header_reward_finish_and_filters", "tests/test_writer.py"),
        "a trajectory's completion_tokens add up the prompt tokens",
    ),
    # ---- proxy/recording/spool.py ----
    Mutation(
        "spool-ignores-limit",
        "proxy/recording/spool.py",
        "            if self._bytes + len(data) > self.max_bytes:",
        "            if False:",
        ("tests/test_outage.py",),
        "the spool grows past TOKENTRAIL_SPOOL_MAX_BYTES",
    ),
    Mutation(
        "unfinished-replay-overwritten",
        "proxy/recording/spool.py",
        "            if self._replay_waiting:\n                return self.replaying\n",
        "",
        ("tests/test_writer.py::test_a_replay_cut_by_a_crash_is_finished_by_the_next_writer_exactly_once",),
        "a replay a crash cut short is overwritten by the next spool (or never finished)",
    ),
    # ---- proxy/recording/records.py ----
    Mutation(
        "long-prompt-count-unchecked",
        "proxy/recording/records.py",
        "if count != self.prompt_tokens and mismatch not in self.integrity:",
        "if False:",
        ("tests/test_capture.py::test_a_long_prompt_is_kept_as_text_on_the_loop_and_parsed_once_later",),
        "a long chat prompt (kept as text, counted when parsed) is never checked against usage",
    ),
    # ---- proxy/recording/stored_form.py and proxy/storage/stored_calls.py: the stored form ----
    Mutation(
        "stored-form-shares-one-too-many",
        "proxy/storage/stored_calls.py",
        "    return low\n",
        "    return low + 1\n",
        ("tests/test_stored_calls.py",),
        "the shared prefix of two prompts is one token too long: a prompt reads back wrong",
    ),
    Mutation(
        "stored-form-key-order",
        "proxy/recording/stored_form.py",
        "    while count and jsonio.dumps_text(messages[:count])"
        " != jsonio.dumps_text(base_messages[:count]):",
        "    while False:",
        ("tests/test_stored_calls.py",),
        "messages equal in value but not in key order are shared: the request reads back reordered",
    ),
    Mutation(
        "stored-form-generated-skipped",
        "proxy/recording/stored_form.py",
        "    return shared + common_prefix(prompt_ids[shared:], generated)",
        "    return shared",
        ("tests/test_stored_calls.py",),
        "the base's generated IDs are never shared: storage grows with turns squared again",
    ),
    Mutation(
        "rebuild-wrong-choice",
        "proxy/storage/stored_calls.py",
        "own += generated.get((link.id, after.form.base_choice_index or 0), [])",
        "own += generated.get((link.id, 0), [])",
        ("tests/test_stored_calls.py",),
        "a prompt stored against choice 1 of an n=2 call is rebuilt from choice 0",
    ),
    # ---- proxy/storage/queries.py ----
    Mutation(
        "paging-no-tiebreak",
        "proxy/storage/queries.py",
        "            (TRAJECTORIES.c.created_at > created)\n"
        "            | ((TRAJECTORIES.c.created_at == created) & (TRAJECTORIES.c.id > trajectory_id))\n",
        "            TRAJECTORIES.c.created_at > created\n",
        ("tests/test_api.py::test_pagination_of_trajectories_made_at_the_same_instant_walks_each_once",),
        "paging drops the (created_at, id) tie-break: trajectories made at one instant are skipped",
    ),
    Mutation(
        "failed-calls-trained-on",
        "proxy/storage/queries.py",
        '.where(CALLS.c.trajectory_id.in_(ids), CALLS.c.outcome == "ok")',
        ".where(CALLS.c.trajectory_id.in_(ids))",
        ("tests/test_api.py::test_a_call_that_did_not_end_ok_is_left_out_of_the_sequences",),
        "calls that did not end ok (cut, aborted, errors) go into the training sequences",
    ),
    # ---- proxy/storage/bulk.py ----
    Mutation(
        "sqlite-time-truncated",
        "proxy/storage/bulk.py",
        "        micro = round(fraction * 1e6)",
        "        micro = int(fraction * 1e6)",
        ("tests/test_writer.py::test_sqlite_timestamps_are_the_text_sqlalchemy_would_store",),
        "SQLite times are cut, not rounded, as SQLAlchemy would store them: ordering and paging drift",
    ),
    # ---- proxy/training/: sequences, export, policy ----
    Mutation(
        "unchosen-branch-dropped",
        "proxy/training/sequences.py",
        "            done.extend(b for b in open_branches if b is not parent)",
        "            pass",
        ("tests/test_api.py::test_an_n2_call_keeps_the_branch_its_next_call_did_not_continue",),
        "the branches of an n>1 call that the next call did not continue are dropped",
    ),
    Mutation(
        "loss-mask-off-by-one",
        "proxy/training/sequences.py",
        "loss_mask=self.loss_mask + [0] * len(tail) + [1] * len(generated),",
        "loss_mask=self.loss_mask + [0] * (len(tail) + 1) + [1] * (len(generated) - 1),",
        ("tests/test_api.py", "tests/test_export.py"),
        "the loss mask starts one token late: the first generated token is not trained on",
    ),
    Mutation(
        "prefix-break-hidden",
        "proxy/training/sequences.py",
        "            if open_branches:\n                latest = open_branches[0]",
        "            if False:\n                latest = open_branches[0]",
        ("tests/test_api.py::test_sequences_of_a_trajectory_count_prefix_mismatches",),
        "a call whose prompt does not extend the previous one starts a new sequence silently",
    ),
    Mutation(
        "logprobs-misaligned",
        "proxy/training/sequences.py",
        "logprobs=self.logprobs + [None] * len(tail) + logprobs,",
        "logprobs=self.logprobs + logprobs + [None] * len(tail),",
        ("tests/test_api.py", "tests/test_export.py"),
        "the logprobs are put before the prompt tail, not on the generated tokens",
    ),
    Mutation(
        "staleness-off-by-one",
        "proxy/training/policy.py",
        "    newest = len(ranks) - 1",
        "    newest = len(ranks)",
        (
            "tests/test_rl.py::test_the_export_gives_versions_staleness_and_group_advantages_and_filters_on_them",
        ),
        "every sequence is one version staler than it is",
    ),
    Mutation(
        "newest-version-stamped",
        "proxy/training/policy.py",
        "            oldest = min(known, key=ranks.__getitem__)",
        "            oldest = max(known, key=ranks.__getitem__)",
        ("tests/test_rl.py::test_a_sequence_over_several_versions_is_stamped_with_its_oldest",),
        "a sequence is stamped with its newest policy version, not its oldest",
    ),
    Mutation(
        "export-pages-repeat",
        "proxy/training/export.py",
        '        after = (rows[-1]["created_at"], rows[-1]["id"])',
        '        after = (rows[0]["created_at"], rows[0]["id"])',
        ("tests/test_export.py::test_an_export_read_in_small_batches_gives_each_trajectory_once",),
        "the export's next page starts after the first row of the last one: trajectories repeat",
    ),
    # ---- proxy/token_in/: the prompt IDs built for a continuing call, and drift ----
    Mutation(
        "token-in-tail",
        "proxy/token_in/prompt.py",
        "*tail[sampled:]",
        "*tail",
        ("tests/test_token_in.py::test_the_end_of_turn_the_model_sampled_itself_is_not_added_again",),
        "token-in adds the end-of-turn the model already sampled again",
    ),
    Mutation(
        "token-in-tail-unchecked",
        "proxy/token_in/prompt.py",
        "if not tail or history.last(len(tail)) != tail:",
        "if not tail:",
        ("tests/test_token_in.py",),
        "a history render that does not end with the template's tail is spliced anyway",
    ),
    Mutation(
        "token-in-kept-render-not-checked",
        "proxy/token_in/prompt.py",
        "                    return whole.after(kept_render), kept_render\n",
        "                    return whole.ids()[len(kept_render.ids()) :], kept_render\n",
        (
            "tests/test_token_in_render.py::"
            "test_a_kept_stand_in_render_the_template_no_longer_gives_is_rendered_again",
        ),
        "a kept stand-in render is used without checking it still starts the call's render",
    ),
    Mutation(
        "token-in-any-4xx-distrusts-the-template",
        "proxy/token_in/prompt.py",
        "transport=response.status_code not in (400, 422),",
        "transport=response.status_code >= 500,",
        (
            "tests/test_token_in_render.py::"
            "test_a_tokenize_failure_that_is_not_the_templates_falls_back_that_call_alone",
        ),
        "a 429 from /tokenize sends the template back to full renders for good",
    ),
    Mutation(
        "token-in-refused-stand-in-fails-the-call",
        "proxy/token_in/prompt.py",
        "            if failed.transport:\n                raise\n",
        "            raise\n",
        (
            "tests/test_token_in_render.py::"
            "test_a_template_that_refuses_the_stand_in_keeps_token_in_with_full_renders",
        ),
        "a stand-in vLLM refuses fails the call instead of teaching the template",
    ),
    Mutation(
        "fallback-stays-token-in",
        "proxy/token_in/planner.py",
        "    def _fall_back(self, record: CallRecord, reason: str) -> None:\n"
        "        record.token_in = False\n",
        "    def _fall_back(self, record: CallRecord, reason: str) -> None:\n",
        ("tests/test_token_in.py",),
        "a call that fell back (vLLM refused the IDs) is still recorded as token_in",
    ),
    Mutation(
        "ignored-ids-unnoticed",
        "proxy/token_in/planner.py",
        "if record.token_in and record.load_prompt_ids() not in (None, prompt_ids):",
        "if False:",
        ("tests/test_token_in.py",),
        "vLLM answering with other prompt IDs than those sent is not noticed",
    ),
    Mutation(
        "concurrent-same-base",
        "proxy/trajectory/memory.py",
        "if any(o.base == base for o in found.open if o is not opened):",
        "if False:",
        ("tests/test_token_in.py::test_two_open_calls_are_never_built_on_the_same_previous_call",),
        "two open calls are built on the same previous call",
    ),
    Mutation(
        "tools-change-ignored",
        "proxy/trajectory/continuation.py",
        "    if _render_options(request) != _render_options(past.request):\n"
        "        return Reason.OPTIONS_CHANGED\n",
        "",
        ("tests/test_token_in.py",),
        "a call whose chat template options changed is continued with the old rendering",
    ),
    Mutation(
        "trimmed-history-continued",
        "proxy/trajectory/continuation.py",
        "    if len(current) <= len(previous):",
        "    if len(current) < len(previous):",
        ("tests/test_token_in.py",),
        "a request that repeats the previous messages without the reply is not said to be trimmed",
    ),
    Mutation(
        "drift-template-as-retokenized",
        "proxy/trajectory/drift.py",
        "        return Drift.TEMPLATE, position",
        "        return Drift.RETOKENIZED, position",
        ("tests/test_token_in.py",),
        "a prompt that differs inside the previous prompt is called retokenized, not template",
    ),
    Mutation(
        "drift-token-in-as-extends",
        "proxy/trajectory/drift.py",
        "return (Drift.TOKEN_IN if built else Drift.EXTENDS), None",
        "return Drift.EXTENDS, None",
        ("tests/test_token_in.py",),
        "a token-in call is recorded as extends",
    ),
    # ---- proxy/metrics/snapshot.py: the sum over workers ----
    Mutation(
        "stale-gauges-added",
        "proxy/metrics/snapshot.py",
        "gauges=age <= STALE_S",
        "gauges=True",
        ("tests/test_metrics.py::test_a_stopped_workers_counters_still_count_but_its_gauges_do_not",),
        "a stopped worker's gauges (queue, in flight) still add up",
    ),
    Mutation(
        "stale-counters-dropped",
        "proxy/metrics/snapshot.py",
        "(metric.kind is Kind.GAUGE and not gauges)",
        "not gauges",
        ("tests/test_metrics.py::test_a_stopped_workers_counters_still_count_but_its_gauges_do_not",),
        "a stopped worker's counters are dropped: they look like a counter reset",
    ),
    Mutation(
        "upstream-up-max",
        "proxy/metrics/snapshot.py",
        "into[key] = min(float(mine), value)",
        "into[key] = max(float(mine), value)",
        ("tests/test_metrics.py::test_an_upstream_any_worker_sees_down_is_down",),
        "upstream_up is combined with max: up while one worker sees it down",
    ),
    # ---- proxy/rl/: aborts, versions, groups ----
    Mutation(
        "aborted-never-set",
        "proxy/rl/loop.py",
        "            record.outcome = Outcome.ABORTED",
        "            pass",
        ("tests/test_rl.py::test_a_stream_an_abort_pause_ends_is_recorded_as_aborted",),
        "the aborted outcome is never set",
    ),
    Mutation(
        "policy-header-ignored",
        "proxy/rl/loop.py",
        "record.weight_version = policy_header if policy_header is not None"
        " else self.weights.current(upstream)",
        "record.weight_version = self.weights.current(upstream)",
        ("tests/test_rl.py",),
        "a call's X-Policy-Version is replaced by the upstream's version",
    ),
    Mutation(
        "group-std-of-sample",
        "proxy/rl/groups.py",
        "std = math.sqrt(sum((r - mean) ** 2 for r in known) / len(known))",
        "std = math.sqrt(sum((r - mean) ** 2 for r in known) / max(1, len(known) - 1))",
        ("tests/test_rl.py::test_group_advantages_are_normalised_over_the_rewarded_trajectories",),
        "group advantages divide by the sample std, not the population std the docs promise",
    ),
    # ---- proxy/app.py: shutdown ----
    Mutation(
        "shutdown-no-wait",
        "proxy/app.py",
        "            if not await relay.in_flight.wait_idle(_DRAIN_AFTER_SHUTDOWN_S):\n"
        '                logger.error("in_flight=<%d> | calls still open at shutdown", '
        "relay.in_flight.count)\n",
        "",
        ("tests/test_shutdown.py::test_a_call_open_when_the_lifespan_ends_is_answered_and_recorded",),
        "shutdown closes the writer without waiting for the calls in flight",
    ),
    # ---- issue 23: one story across processes (fleet control, metric counts, trajectory state) ----
    Mutation(
        "aborted-unfinished-ok",
        "proxy/rl/loop.py",
        "(aborting and (broken or unfinished))",
        "(aborting and broken)",
        ("tests/test_rl.py::test_a_stream_an_abort_pause_ends_is_recorded_as_aborted",),
        "a stream vLLM aborted before its first token (no finish reason) is recorded ok",
    ),
    Mutation(
        "pause-outlives-a-newer-resume",
        "proxy/rl/loop.py",
        "        self._newer_request.set()  # wakes a drain of an older request\n",
        "",
        (
            "tests/test_rl.py::test_a_resume_that_comes_while_a_wait_pause_drains_wins_and_nothing_stays_paused",
        ),
        "a wait pause superseded by a resume goes on waiting for the running calls",
    ),
    Mutation(
        "version-change-not-shared",
        "proxy/rl/control.py",
        "        self.state.versions.update(versions)\n        await self.members.set_versions(versions)\n",
        "        self.state.versions.update(versions)\n",
        (
            "tests/test_fleet.py::test_a_version_set_through_one_worker_is_known_to_every_worker_before_its_answer",
        ),
        "a version set through one worker stays that worker's",
    ),
    Mutation(
        "fleet-gates-never-opened",
        "proxy/fleet/hub.py",
        '        await self._all({"cmd": "open", "versions": versions})\n',
        "        return None\n",
        (
            "tests/test_fleet.py::"
            "test_calls_held_by_a_pause_on_any_worker_go_when_any_worker_resumes_with_the_new_version",
        ),
        "a resume opens no worker's gate: held calls wait until the pause limit",
    ),
    Mutation(
        "restarted-worker-not-paused",
        "proxy/fleet/link.py",
        '        if state.get("paused"):',
        "        if False:",
        ("tests/test_fleet.py::test_a_worker_restarted_during_a_pause_holds_its_calls_too",),
        "a worker restarted during a pause lets its calls through to a paused vLLM",
    ),
    Mutation(
        "replica-drain-ignores-other-replicas",
        "proxy/fleet/replicas.py",
        "if all(r.drained_generation >= generation for r in self._others(replicas)):",
        "if True:",
        (
            "tests/test_replica_control.py::"
            "test_a_wait_pause_waits_for_the_other_replicas_calls_and_a_resume_there_supersedes_it",
        ),
        "a wait pause pauses vLLM while another replica's calls still run",
    ),
    Mutation(
        "replica-versions-not-shared",
        "proxy/fleet/replicas.py",
        "        row = await self._publish_and_apply(_KEEP, versions)\n",
        "        row = await self._publish_and_apply(_KEEP, None)\n"
        "        await self.inner.set_versions(versions)\n",
        (
            "tests/test_replica_control.py::"
            "test_a_version_set_through_one_replica_is_known_to_the_other_before_its_answer",
        ),
        "a version set through one replica stays that replica's: the others stamp the old one",
    ),
    Mutation(
        "replica-gates-not-opened-by-the-row",
        "proxy/fleet/replicas.py",
        "                await self.inner.open(dict(row.versions))\n",
        "                pass\n",
        (
            "tests/test_replica_control.py::"
            "test_calls_held_by_a_pause_through_one_replica_go_when_the_other_resumes_with_the_new_version",
        ),
        "a resume through one replica leaves the other replicas' calls held",
    ),
    Mutation(
        "replica-resume-writes-its-versions-back",
        "proxy/fleet/replicas.py",
        "        row = await self._publish_and_apply(None, None)\n",
        "        row = await self._publish_and_apply(None, versions)\n",
        ("tests/test_replica_control.py::test_a_resume_never_writes_an_older_version_over_the_fleets",),
        "a resume writes the resuming replica's versions over a newer one another replica set",
    ),
    Mutation(
        "metric-counts-not-committed",
        "proxy/recording/writer.py",
        "            self._count_in(connection, encoder, batch)\n",
        "",
        (
            "tests/test_writer.py::test_metric_counts_are_committed_with_their_records_and_survive_a_restart",
            "tests/test_metrics.py::test_metrics_agree_with_the_database_after_a_mixed_load",
        ),
        "the counts of recorded calls are not written with the records",
    ),
    Mutation(
        "gate-not-checked-after-build",
        "proxy/relay/recorded_call.py",
        "        if self.context.rl is not None and self.context.rl.gate.paused:\n"
        "            await self._pass_the_gate()\n        if rewritten is None:",
        "        if rewritten is None:",
        (
            "tests/test_token_in.py::"
            "test_a_call_whose_prompt_was_being_built_when_the_pause_came_waits_at_the_gate",
        ),
        "a token-in call whose prompt was built during a pause reaches the paused vLLM",
    ),
    Mutation(
        "record-never-waits-for-the-turn-before",
        "proxy/recording/order.py",
        "                if now - since < bound:",
        "                if False:",
        (
            "tests/test_fleet_order.py::test_a_turn_written_by_another_replica_first_waits_for_the_turn_before_it",
        ),
        "across replicas a turn written before the one it follows takes the lower seq",
    ),
    Mutation(
        "record-waits-past-its-bound",
        "proxy/recording/order.py",
        "                if now - since < bound:",
        "                if True:",
        (
            "tests/test_fleet_order.py::"
            "test_a_turn_whose_earlier_turn_never_comes_in_time_is_written_and_counted_unproven",
        ),
        "a record whose earlier turn never comes is held for good (never written)",
    ),
    Mutation(
        "held-record-wait-restarts-behind-another",
        "proxy/recording/order.py",
        "                self._since[record.call_id] = since\n                self._waiting.append(record)\n",
        "                self._waiting.append(record)\n",
        ("tests/test_fleet_order.py::test_every_record_waits_at_most_its_bound_from_when_it_began_to_wait",),
        "a record behind a held one starts its own wait only at the head: waits add up without bound",
    ),
    Mutation(
        "first-turn-waits-the-full-bound",
        "proxy/recording/order.py",
        "bound = self._wait_s if awaits == Awaits.TURN else min(self._wait_s, FIRST_TURN_WAIT_S)",
        "bound = self._wait_s",
        ("tests/test_fleet_order.py::test_every_record_waits_at_most_its_bound_from_when_it_began_to_wait",),
        "a few-shot first call is held the whole bound, and token-in's next turns with it",
    ),
    Mutation(
        "failed-attempt-taken-for-the-turn",
        "proxy/trajectory/memory.py",
        "select(CALLS.c.id).where(CALLS.c.trajectory_id == trajectory_id, CALLS.c.id.in_(answered))",
        "select(CALLS.c.id).where(CALLS.c.trajectory_id == trajectory_id)",
        ("tests/test_fleet_order.py::test_every_record_waits_at_most_its_bound_from_when_it_began_to_wait",),
        "a failed attempt with the same history is taken for the retry that gave the reply",
    ),
    Mutation(
        "held-records-kept-at-shutdown",
        "proxy/recording/order.py",
        "        if flush or not records or not self._others_writing():",
        "        if not records or not self._others_writing():",
        ("tests/test_fleet_order.py::test_a_held_record_is_written_when_its_writer_stops",),
        "records still held when the writer stops are never written",
    ),
    Mutation(
        "later-record-overtakes-a-held-one",
        "proxy/recording/order.py",
        "            if trajectory_id in blocked:",
        "            if False:",
        (
            "tests/test_fleet_order.py::"
            "test_records_behind_a_held_one_wait_with_it_and_come_after_the_turn_it_waits_for",
        ),
        "a later record of a trajectory is written before the earlier one held for its turn",
    ),
    Mutation(
        "held-record-never-judged-again",
        "proxy/recording/order.py",
        "            if judged is not None and not mine and tops.get(trajectory_id) == judged[0]:",
        "            if judged is not None:",
        ("tests/test_fleet_order.py::test_a_held_record_goes_once_the_turn_it_waits_for_is_written",),
        "a held record waits out its bound although the turn it waits for was written",
    ),
    Mutation(
        "prefill-counts-as-a-reply",
        "proxy/trajectory/continuation.py",
        "    for index in range(len(messages) - 2, -1, -1):",
        "    for index in range(len(messages) - 1, -1, -1):",
        ("tests/test_fleet_order.py::test_every_record_waits_at_most_its_bound_from_when_it_began_to_wait",),
        "a trailing assistant message (a prefill) makes a record wait for a call that never was",
    ),
    Mutation(
        "any-earlier-call-accounts-for-a-reply",
        "proxy/trajectory/continuation.py",
        "len(history) == index and repeats_then_replies(history, messages)",
        "repeats_then_replies(history, messages)",
        ("tests/test_fleet_order.py::test_turns_two_workers_relay_are_numbered_in_the_order_they_arrived",),
        "the first turn's call is taken for the one a later reply came from: numbered in write order",
    ),
    Mutation(
        "workers-writers-not-peers",
        "proxy/recorder/assembly.py",
        '    if settings.workers > 1 and settings.recorder == "thread":\n        return lambda: True\n',
        "",
        ("tests/test_fleet_order.py::test_records_wait_only_where_other_writers_share_the_database",),
        "workers with the recorder thread never wait for each other's records",
    ),
    Mutation(
        "fleet-lock-taken-after-cancel-kept",
        "proxy/fleet/replicas.py",
        "                taking.add_done_callback(self._unlock_late)\n",
        "",
        ("tests/test_replica_control.py::test_a_request_cancelled_while_taking_the_fleet_lock_lets_it_go",),
        "a fleet lock taken for a request cancelled meanwhile is never let go: control stops for 10 minutes",
    ),
    Mutation(
        "replica-lease-ignored",
        "proxy/fleet/replicas.py",
        "        return self.silent_s <= lease_s",
        "        return True",
        (
            "tests/test_replica_control.py::"
            "test_a_replica_silent_past_its_lease_is_not_waited_for_until_the_acknowledgement_limit",
        ),
        "a dead replica holds every pause up for the acknowledgement limit",
    ),
    Mutation(
        "token-in-upstream-back-not-forgotten",
        "proxy/app.py",
        "        balancer.on_back.append(token_in.upstream_back)\n",
        "",
        ("tests/test_token_in.py::test_an_upstream_back_after_being_down_is_learned_again",),
        "a vLLM restarted with another template keeps the old template's tail: token-in falls back for good",
    ),
    Mutation(
        "memory-trusted-unproven",
        "proxy/token_in/planner.py",
        "if suffix_has_reply(found, request) or (not isinstance(found, Continuation) and not read_now)",
        "if False",
        ("tests/test_trajectory_state.py",),
        "a call built on remembered calls although another process relayed a later turn",
    ),
    Mutation(
        "unrecorded-reply-built-anyway",
        "proxy/token_in/planner.py",
        "                return Fallback.REPLY_NOT_RECORDED\n",
        "                return found\n",
        (
            "tests/test_trajectory_state.py::"
            "test_a_call_whose_previous_turn_is_never_written_in_time_falls_back_with_a_reason",
        ),
        "a reply no recorded call gave is re-rendered from text and the call still called token-in",
    ),
    Mutation(
        "drift-cache-trusted-stale",
        "proxy/trajectory/drift.py",
        "                cached = None  # another process wrote calls since: read them\n",
        "                pass\n",
        (
            "tests/test_trajectory_state.py::test_the_writer_judges_a_call_against_what_the_database_holds_not_its_cache",
        ),
        "the writer judges a call against its cache although another process wrote since",
    ),
    Mutation(
        "kv-transfer-null-kept",
        "proxy/token_in/planner.py",
        "    if key in body:  # rare",
        "    if False:  # rare",
        (
            "tests/test_token_in.py::test_the_prompt_ids_go_into_the_body_and_the_header_decides_per_call",
            "tests/test_token_in.py::test_a_body_with_an_explicit_null_kv_transfer_params_still_carries_the_ids",
        ),
        "an explicit kv_transfer_params null stays in the body and vLLM ignores the IDs",
    ),
    # ---- proxy/recorder/: the recorder process and the relays' link to it ----
    Mutation(
        "resent-written-twice",
        "proxy/recording/writer.py",
        "if any(record.resent for record in batch):",
        "if False:",
        ("tests/test_recorder.py::test_a_record_handed_over_again_is_written_once",),
        "a record handed over again after a recorder restart is tried again, refused and set aside as failed",
    ),
    Mutation(
        "dead-relay-holds-trajectory",
        "proxy/recorder/service.py",
        "self.service.writer.skip(trajectory_id, ordinal)",
        "pass",
        ("tests/test_recorder.py::test_a_relay_that_dies_does_not_hold_back_its_trajectorys_later_calls",),
        "a relay killed with a call open holds back its trajectory's later calls forever",
    ),
    Mutation(
        "arrival-order-ignored",
        "proxy/recorder/service.py",
        "arrival[1] if arrival is not None else self.service.writer.next_ordinal(record.trajectory_id)",
        "self.service.writer.next_ordinal(record.trajectory_id)",
        (
            "tests/test_recorder.py::test_calls_are_numbered_in_the_order_they_reached_the_host_whichever_relay_took_them",
        ),
        "calls are numbered in the order their records reach the recorder, not the order they arrived",
    ),
    Mutation(
        "unacked-not-resent",
        "proxy/recorder/link.py",
        "for waiting in self._waiting.values():  # all of them again: any may have been lost",
        "for waiting in []:",
        ("tests/test_recorder.py::test_killing_the_recorder_loses_nothing_and_writes_nothing_twice",),
        "records a killed recorder had not committed are never handed to the next one",
    ),
    Mutation(
        "ack-before-commit",
        "proxy/recorder/service.py",
        "record.on_stored = stored\n        self.service.writer.submit(record)",
        "self.service.writer.submit(record)\n        stored(True)",
        ("tests/test_recorder.py::test_a_durable_answer_ends_after_the_recorder_committed_it",),
        "the recorder acknowledges a record before it is committed: a durable answer ends too early",
    ),
    Mutation(
        "spool-not-replayed-to-recorder",
        "proxy/recorder/link.py",
        "self._spool.pending\n            and self._replay is None",
        "False\n            and self._replay is None",
        ("tests/test_recorder.py::test_records_wait_in_the_relays_spool_while_no_recorder_answers",),
        "records a relay spooled while its recorder was away stay in the spool",
    ),
    Mutation(
        "raw-error-event-ok",
        "proxy/recording/capture.py",
        "if record.error is not None and record.outcome == Outcome.OK:",
        "if False:",
        (
            "tests/test_recorder.py::test_a_stream_vllm_ends_with_an_error_event_is_recorded_as_an_upstream_error",
        ),
        "a stream vLLM ended with an error event is recorded ok when the recorder reads it",
    ),
]


def module_of(mutation: Mutation) -> str:
    return mutation.path


def _test_problem(test: str) -> str | None:
    """Why ``test`` (a file or a node id) does not name an existing test, or None."""
    file, _, node = test.partition("::")
    path = ROOT / file
    if not path.is_file():
        return f"test file {file} does not exist"
    if node:
        name = node.split("::")[-1].split("[")[0]
        if not re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", path.read_text(), re.MULTILINE):
            return f"test {name} is not in {file}"
    return None


def problems(mutation: Mutation) -> list[str]:
    """Why ``mutation`` cannot run as written (its target is not there exactly once, a test it names
    is missing); empty when it applies."""
    found: list[str] = []
    path = ROOT / mutation.path
    if not path.is_file():
        return [f"{mutation.path} does not exist"]
    count = path.read_text().count(mutation.old)
    if count != 1:
        found.append(f"its target text is in {mutation.path} {count} times, not once")
    if mutation.old == mutation.new:
        found.append("it changes nothing")
    if not mutation.tests:
        found.append("it names no test")
    found += [p for p in map(_test_problem, mutation.tests) if p is not None]
    return found


def check(mutations: list[Mutation]) -> dict[str, list[str]]:
    """Each mutation that cannot run, by name, with why; also duplicate names."""
    found = {m.name: p for m in mutations if (p := problems(m))}
    seen: set[str] = set()
    for mutation in mutations:
        if mutation.name in seen:
            found.setdefault(mutation.name, []).append("the name is used twice")
        seen.add(mutation.name)
    return found


def run(mutation: Mutation, show: bool = False) -> tuple[str, float]:
    """Apply ``mutation``, run its tests, restore the file: 'caught', 'MISSED' or 'STALE: why'
    (``show``: print which tests failed, to see that they failed for the bug)."""
    wrong = problems(mutation)
    if wrong:
        return "STALE: " + "; ".join(wrong), 0.0
    if subprocess.run(["git", "diff", "--quiet", "--", mutation.path], cwd=ROOT, check=False).returncode:
        return "STALE: the file has uncommitted changes", 0.0
    path = ROOT / mutation.path
    original = path.read_bytes()
    started = time.monotonic()
    try:
        path.write_bytes(original.decode().replace(mutation.old, mutation.new).encode())
        returncode, output = _pytest(mutation.tests)
    finally:
        path.write_bytes(original)
    seconds = time.monotonic() - started
    if returncode is None:
        return "caught (timeout)", seconds
    if show:
        for line in output.splitlines():
            if line.startswith(("FAILED ", "ERROR tests")):
                print(f"    {line[:200]}")
    if returncode in (1, 2):  # tests failed (or could not be collected with the bug in)
        return "caught", seconds
    if returncode == 0:
        return "MISSED", seconds
    tail = output.strip().splitlines()[-1:]
    return f"STALE: pytest exit {returncode} {' '.join(tail)}", seconds


def _pytest(tests: tuple[str, ...]) -> tuple[int | None, str]:
    """Run ``tests`` (without the vLLM or browser marks): pytest's exit code (None: timed out) and output."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["-m", "not vllm and not browser", *tests]
    # its own process group: on a timeout the servers and CLIs the tests started go with it
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None, ""
    return process.returncode, output


def broken_without_bugs(chosen: list[Mutation]) -> dict[tuple[str, ...], str]:
    """The test sets of ``chosen`` that fail with no bug planted (a failure with the bug would then
    prove nothing): each distinct set is run once, unmutated."""
    broken: dict[tuple[str, ...], str] = {}
    for tests in dict.fromkeys(m.tests for m in chosen):
        returncode, output = _pytest(tests)
        if returncode != 0:
            tail = output.strip().splitlines()[-1:] if output else ["timed out"]
            broken[tests] = f"BROKEN: its tests fail with no bug planted ({' '.join(tail)[:120]})"
    return broken


def report(results: list[tuple[Mutation, str]]) -> tuple[float, list[str]]:
    """The score per module (printed) and overall (returned, with the lines)."""
    by_module: dict[str, list[bool]] = defaultdict(list)
    for mutation, verdict in results:
        by_module[module_of(mutation)].append(verdict.startswith("caught"))
    lines = []
    for module, caught in sorted(by_module.items()):
        lines.append(f"  {module:36} {sum(caught):3d}/{len(caught):<3d} {sum(caught) / len(caught):6.0%}")
    total = [v.startswith("caught") for _, v in results]
    score = sum(total) / len(total) if total else 0.0
    lines.append(f"  {'overall':36} {sum(total):3d}/{len(total):<3d} {score:6.0%}  (bar {BAR:.0%})")
    return score, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="check every mutation applies; run no test")
    parser.add_argument("--module", action="append", default=[], help="only the mutations of this file")
    parser.add_argument("--show", action="store_true", help="print the tests that failed for each mutation")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip running each test set once with no bug planted (then a broken test counts as a catch)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"no mutation named {', '.join(unknown)} (see --list)")
    chosen = [
        m
        for m in MUTATIONS
        if (not args.names or m.name in args.names) and (not args.module or m.path in args.module)
    ]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name:34} {mutation.path:32} {mutation.what}")
        return 0
    if args.check:
        started = time.monotonic()
        found = check(chosen)
        for name, why in found.items():
            print(f"{name:34} STALE  {'; '.join(why)}")
        seconds = time.monotonic() - started
        print(f"{len(chosen) - len(found)} of {len(chosen)} mutations apply ({seconds:.2f} s)")
        return 1 if found else 0
    if not chosen:
        parser.error("no mutation matches")
    results: list[tuple[Mutation, str]] = []
    started = time.monotonic()
    broken = {} if args.no_baseline else broken_without_bugs(chosen)
    if not args.no_baseline:
        print(f"baseline: {len(broken)} broken test set(s), {time.monotonic() - started:.0f} s", flush=True)
    for mutation in chosen:
        verdict, seconds = (
            (broken[mutation.tests], 0.0) if mutation.tests in broken else run(mutation, args.show)
        )
        results.append((mutation, verdict))
        print(
            f"{mutation.name:34} {verdict:8} {seconds:6.1f} s  {mutation.path}: {mutation.what}", flush=True
        )
    score, lines = report(results)
    print(f"score per module ({time.monotonic() - started:.0f} s in all):")
    print("\n".join(lines))
    bad = [m.name for m, v in results if not v.startswith("caught")]
    if bad:
        print(f"missed or stale: {', '.join(bad)}")
    return 1 if bad or score < BAR else 0


if __name__ == "__main__":
    sys.exit(main())
