"""``report.html``: the validation report as a page a browser shows, beside ``report.json``.

What a person deciding on a release reads: the verdict, the paired comparison with the
published model, each class's recall before and after (the classes that got worse first
in mind), the edge formats, the dataset and evaluation set, and the confusion matrices.
The picture is embedded (a data URI), so the page opens whole from a presigned link,
which could not sign a second request for a neighbouring file. Jinja2 (Airflow's own)
renders it with autoescaping: job names and reasons are data, never markup.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Mapping

from headpose.artifacts.comparison import describe
from headpose.artifacts.confusion_plot import recall_changes

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ r.training_job_name }}: validation report</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 90em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.worse { background: #fde2e1; } .worst { background: #f8b4b0; font-weight: bold; }
.accepted { color: #1a7f37; } .refused { color: #b42318; }
</style></head><body>
<h1>{{ r.training_job_name }}</h1>
<p class="{{ 'accepted' if r.accepted else 'refused' }}"><strong>{{ 'Accepted' if r.accepted else 'Refused' }}</strong>
{%- if r.problems %}: {{ r.problems | join('; ') }}{% endif %} (evaluated {{ r.evaluated_at }})</p>
<h2>Accuracy on {{ (r.evaluation_set or {}).get('id', 'the evaluation set') }}</h2>
<table><tr><th>model</th><th>accuracy</th><th>images</th></tr>
<tr><td>new: {{ r.training_job_name }}</td><td>{{ '%.4f' % r.accuracy }}</td><td>{{ r.images }}</td></tr>
{%- if champion.present %}
<tr><td>published: {{ champion.training_job_name }}</td>
<td>{{ '%.4f' % champion.accuracy if champion.accuracy is not none else champion.error }}</td><td>{{ champion.images }}</td></tr>
{%- endif %}</table>
{%- if comparison %}
<h2>Paired comparison</h2>
<p>{{ comparison_line }}</p><p>{{ comparison.test }}; rule <code>{{ comparison.rule }}</code>: {{ comparison.reason }}.</p>
{%- elif champion.present %}<p>Not compared image by image: {{ champion.error or champion.comparison }}</p>
{%- else %}<p>Nothing is published yet: there is no model to compare with.</p>{%- endif %}
<h2>Recall of each class</h2>
<table><tr><th>class</th><th>images</th><th>before (published)</th><th>after (new)</th><th>change</th></tr>
{%- for row in recalls %}
<tr class="{{ 'worst' if row.worst else 'worse' if row.change is not none and row.change < 0 else '' }}">
<td>{{ row.label }}{% if row.worst %} (worst change){% endif %}</td><td>{{ row.images }}</td>
<td>{{ '%.3f' % row.before if row.before is not none else '-' }}</td>
<td>{{ '%.3f' % row.after if row.after is not none else '-' }}</td>
<td>{{ '%+.3f' % row.change if row.change is not none else '-' }}</td></tr>
{%- endfor %}</table>
{%- if worse %}<p>Got worse: {{ worse | join(', ') }}.</p>{% else %}<p>No class got worse.</p>{% endif %}
<h2>Edge formats</h2>
{%- if formats %}
<table><tr><th>format</th><th>published</th><th>accuracy</th><th>batch-1 latency (ms)</th><th>max abs diff</th><th>why not</th></tr>
{%- for name, f in formats %}
<tr><td>{{ name }}</td><td>{{ 'yes' if f.accepted else 'no' }}</td>
<td>{{ '%.4f' % f.accuracy if f.accuracy is number else '-' }}</td>
<td>{{ '%.2f' % f.latency_ms_b1 if f.latency_ms_b1 is number else '-' }}</td>
<td>{{ '%.2g' % f.max_abs_diff if f.max_abs_diff is number else '-' }}</td><td>{{ f.reason or '' }}</td></tr>
{%- endfor %}</table>
{%- else %}<p>No edge formats were judged.</p>{%- endif %}
<h2>Data</h2>
<table><tr><th>what</th><th>value</th></tr>
<tr><td>evaluation set</td><td>{{ (r.evaluation_set or {}).get('id') }}{{ ' (pinned by the deployment)' if (r.evaluation_set or {}).get('pinned') else '' }}</td></tr>
{%- for key in ('dataset_id', 'source', 'dataset_prefix', 'train_count', 'eval_count', 'manifest_sha256') %}
<tr><td>dataset {{ key }}</td><td>{{ (r.dataset or {}).get(key) }}</td></tr>
{%- endfor %}</table>
<h2>Confusion matrices (rows: true class)</h2>
<img alt="confusion matrix of the new model{{ ' beside the published one' if champion.present else '' }}" src="data:image/png;base64,{{ png }}" style="max-width: 100%">
</body></html>
"""


def render_report_html(report: Mapping[str, Any], confusion_png: str | Path) -> str:
    """The page for ``report`` (``report.json``'s content) with its confusion picture embedded."""
    from jinja2 import Environment

    champion = dict(report.get("champion") or {})
    recalls = recall_changes({c["name"]: c["accuracy"] for c in report["per_class"]}, champion.get("per_class_recall"),
                             {c["name"]: c["count"] for c in report["per_class"]})
    comparison = report.get("comparison")
    return Environment(autoescape=True).from_string(TEMPLATE).render(
        r=report, champion=champion, comparison=comparison,
        comparison_line=describe(comparison) if comparison else "", recalls=recalls,
        worse=[row["label"] for row in recalls if row["change"] is not None and row["change"] < 0],
        formats=sorted((report.get("formats") or {}).items()),
        png=base64.b64encode(Path(confusion_png).read_bytes()).decode(),
    )


def write_report_html(report: Mapping[str, Any], confusion_png: str | Path, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(render_report_html(report, confusion_png))
    return target
