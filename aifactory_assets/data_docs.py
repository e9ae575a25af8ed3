"""GX Data Docs for a distributed validation: the merged results rendered by GX's own page renderer.

The per-partition GX runs never produce one validation result, so we build the
`ExpectationSuiteValidationResult` GX would have produced for the whole dataset from the merged counts,
and render it with the same renderer and view as `context.build_data_docs()`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from html import escape
from typing import Any


def report_key(dataset: str, run_id: str) -> str:
    """Where a run's Data Docs page for a dataset lives in the site's store (`latest.html` beside it is a copy)."""
    return f"reports/{dataset}/validation-{run_id}.html"


def gx_imported() -> bool:
    """Run on a worker: has validation imported GX here already (rendering elsewhere imports it, 2.4 s)?"""
    return "great_expectations" in sys.modules


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def observed_value(result: dict[str, Any]) -> Any:
    """As GX's renderer reads it (otherwise it shows "--"): quantiles as {quantiles, values} (a statistic
    of a PII column is hidden as one text, which each quantile then shows), and NumPy numbers as Python's,
    which its number formatting takes."""
    observed = result["observed"]
    if result["type"] == "expect_column_quantile_values_to_be_between":
        quantiles = result["kwargs"]["quantile_ranges"]["quantiles"]
        values = observed if isinstance(observed, list) else [observed] * len(quantiles)  # hidden: one text
        return {"quantiles": quantiles, "values": [_plain(v) for v in values]}
    return _plain(observed)


# GX's defaults that its own models require where our judgement supplies them (GX never judges these).
GX_DEFAULTS = {"expect_column_value_z_scores_to_be_less_than": {"double_sided": True}}


def unrenderable_section(results: list[dict[str, Any]]) -> str:
    """Expectations aifactory judges that GX's page cannot show (text bounds of a text column's min or max,
    which GX's models refuse), as a plain table after GX's own."""
    rows = "".join(
        f"<tr><td>{escape(r['label'])}</td><td>{escape(json.dumps(r['kwargs'], default=str))}</td>"
        f"<td>{'passed' if r['success'] else 'failed'}</td><td>{escape(str(r.get('observed', '')))}</td></tr>"
        for r in results
    )
    return (
        '<div class="container"><h4>Judged by aifactory, beyond what GX\'s page shows</h4>'
        '<table class="table"><tr><th>expectation</th><th>arguments</th><th>result</th><th>observed</th></tr>'
        f"{rows}</table></div>"
    )


def render_data_docs(suite_name: str, results: list[dict[str, Any]], run_id: str) -> str:
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    gx_results, beyond = [], []
    for r in results:
        result: dict[str, Any] = {"observed_value": observed_value(r)} if "observed" in r else {}
        if "element_count" in r:
            judged = r["element_count"] - r.get("missing_count", 0)
            result |= {
                "element_count": r["element_count"],
                "missing_count": r.get("missing_count", 0),
                "unexpected_count": r.get("unexpected_count", 0),
                "unexpected_percent": 100.0 * r.get("unexpected_count", 0) / judged if judged else 0.0,
                "partial_unexpected_list": [escape(str(v)) for v in r.get("sample", [])],  # GX writes them raw
            }
        config = ExpectationConfiguration(
            type=r["type"],
            kwargs=GX_DEFAULTS.get(r["type"], {}) | r["kwargs"],
            meta={"severity": r["severity"], "scope": r["scope"]},
        )
        try:
            config.to_domain_obj()  # GX's model of the expectation, which its page renderer builds
        except Exception:  # its validation error: the page would fail whole
            beyond.append(r)
            continue
        gx_results.append(ExpectationValidationResult(success=r["success"], expectation_config=config, result=result))
    passed = sum(r["success"] for r in results)
    validation = ExpectationSuiteValidationResult(
        success=passed == len(results),
        results=gx_results,
        suite_name=suite_name,
        statistics={
            "evaluated_expectations": len(results),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(results) - passed,
            "success_percent": 100.0 * passed / len(results) if results else 100.0,
        },
        meta={
            "run_id": RunIdentifier(run_name=run_id, run_time=dt.datetime.now(dt.UTC)),
            "active_batch_definition": None,
        },
    )
    page = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(validation))
    end = page.rfind("</body>")  # the page's own, after any a sample value may hold
    return f"{page[:end]}{unrenderable_section(beyond)}{page[end:]}" if beyond else page
