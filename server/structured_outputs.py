"""Structured output: a request's `response_format`, vLLM's `guided_*` fields
or a forced tool choice, turned into one llguidance grammar, checked against
the model's vocabulary (a grammar the library refuses is a 400 naming the
field and the failing part), then one `Constraint` per sequence.

The grammar is compiled and checked once per request, off the event loop;
matchers (one per choice) are built from it when the sequences are made.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from modeling.structured import Constraint, GrammarCompiler, GrammarError

from .errors import bad_request


def compiler_for(model) -> GrammarCompiler:
    """The model's grammar compiler (built on first use, kept on the tokenizer)."""
    tok = model.tokenizer
    comp = getattr(tok, "_grammar_compiler", None)
    if comp is None:
        comp = GrammarCompiler(tok.path, model.config.vocab_size, sorted(model.eos_ids))
        tok._grammar_compiler = comp
    return comp


def _choice_grammar(choices: list[str]) -> str:
    # Lark string literals read JSON's escapes: every choice is matched as written
    return "start: " + " | ".join(json.dumps(c) for c in choices) + "\n"


def requested_grammar(req) -> tuple[str, str] | None:
    """(llguidance grammar text, the request field it came from) for the structured-output fields of
    `req` (at most one may be set), or None."""
    found: list[tuple[str, str]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append((GrammarCompiler.json_schema({"type": "object"}), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
        found.append((_schema(schema, "response_format.json_schema.schema"), "response_format"))
    if getattr(req, "guided_json", None) is not None:
        g = req.guided_json
        if isinstance(g, str):
            try:
                g = json.loads(g)
            except ValueError as e:
                raise bad_request(f"guided_json: not JSON ({e})", "guided_json") from None
        found.append((_schema(g, "guided_json"), "guided_json"))
    if getattr(req, "guided_regex", None) is not None:
        found.append((GrammarCompiler.regex(req.guided_regex), "guided_regex"))
    if getattr(req, "guided_choice", None) is not None:
        found.append((GrammarCompiler.lark(_choice_grammar(req.guided_choice)), "guided_choice"))
    if getattr(req, "guided_grammar", None) is not None:
        found.append((GrammarCompiler.lark(req.guided_grammar), "guided_grammar"))
    if len(found) > 1:
        raise bad_request(f"{found[1][1]}: only one of response_format (json), guided_json, guided_regex, "
                          f"guided_choice and guided_grammar may be set (also {found[0][1]})", found[1][1])
    return found[0] if found else None


def _schema(schema: Any, field: str) -> str:
    try:
        return GrammarCompiler.json_schema(schema)
    except GrammarError as e:
        raise bad_request(f"{field}: {e}", field.split(".")[0], "invalid_schema") from None


def checked(model, grammar: str, field: str) -> str:
    """`grammar` once llguidance accepted it for this model's vocabulary; else a 400 naming `field`."""
    try:
        return compiler_for(model).check(grammar)
    except GrammarError as e:
        raise bad_request(f"{field}: the grammar library refuses it: {e}", field.split(".")[0],
                          "invalid_grammar") from None


async def structured_grammar(model, req) -> str | None:
    """The checked grammar of `req`'s structured-output fields (None: unconstrained); 400 on a bad one."""
    found = requested_grammar(req)
    if found is None:
        return None
    if model.tokenizer is None:
        raise bad_request(f"{found[1]}: this model has no tokenizer to constrain", found[1])
    return await asyncio.to_thread(checked, model, *found)


def constraint(model, grammar: str | None) -> Constraint | None:
    return None if grammar is None else compiler_for(model).constraint(grammar)


async def constraints(model, grammar: str | None, n: int) -> list[Constraint | None]:
    """One constraint per sequence; matchers are built off the event loop (a large grammar takes a while)."""
    if grammar is None:
        return [None] * n
    try:
        return await asyncio.to_thread(lambda: [constraint(model, grammar) for _ in range(n)])
    except GrammarError as e:  # checked already; a matcher that still fails is the grammar's fault
        raise bad_request(f"the grammar library refuses the requested format: {e}", None, "invalid_grammar") from None
