"""The dashboard's pages: Jinja templates, kept here as text so the package needs no data files.
Every name ends in ``.html``, so Flask's autoescaping applies to every value they show."""

from __future__ import annotations

__all__ = ["TEMPLATES"]

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
{% block head %}{% endblock %}
<title>{% block title %}eventbus{% endblock %} - eventbus dashboard</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #222; }
nav { padding: .7rem 0; border-bottom: 1px solid #ccc; margin-bottom: 1rem; }
nav a { margin-right: 1.2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left;
         vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; max-width: 100%; }
.dead, .failures { color: #b00020; } .retrying { color: #a86400; }
.succeeded { color: #176b2c; } .note { color: #666; }
.message { background: #eef6ee; padding: .5rem; border: 1px solid #9c9; }
form.inline { display: inline; }
fieldset { border: 1px solid #ddd; margin: .5rem 0; }
</style>
</head>
<body>
<nav>
<strong>eventbus</strong>
{% if available %}<a href="{{ url_for('overview') }}">Overview</a>
<a href="{{ url_for('events') }}">Events</a>
<a href="{{ url_for('dead_letters') }}">Dead letters</a>{% endif %}
<span class="note">{{ store_name }}</span>
</nav>
{% if message %}<p class="message">{{ message }}</p>{% endif %}
{% block body %}{% endblock %}
</body>
</html>
"""

_OVERVIEW = """{% extends "base.html" %}
{% block head %}<meta http-equiv="refresh" content="10">{% endblock %}
{% block title %}Overview{% endblock %}
{% block body %}
<h1>Overview</h1>
<p class="note">Refreshes every 10 seconds. "Last hour": deliveries of events stored in the
last hour, by their state now.</p>
{% if handlers %}
<table>
<thead>
<tr><th rowspan="2">Handler</th>
<th colspan="{{ states|length }}">Last hour</th><th colspan="{{ states|length }}">Total</th></tr>
<tr>{% for s in states %}<th>{{ s }}</th>{% endfor %}{% for s in states %}<th>{{ s }}</th>
{% endfor %}</tr>
</thead>
<tbody>
{% for h in handlers %}
<tr>
<td><a href="{{ url_for('events', handler=h.handler) }}">{{ h.handler }}</a></td>
{% for s in states %}<td class="n {{ s }}">{{ h.hour.get(s, 0) }}</td>{% endfor %}
{% for s in states %}<td class="n {{ s }}">
<a href="{{ url_for('events', handler=h.handler, state=s) }}">{{ h.total.get(s, 0) }}</a>
</td>{% endfor %}
</tr>
{% endfor %}
</tbody>
</table>
{% else %}
<p>No deliveries stored yet.</p>
{% endif %}
<h2>Deliveries per minute, last hour</h2>
<svg xmlns="http://www.w3.org/2000/svg" width="{{ chart.width }}" height="{{ chart.height }}"
     role="img" aria-label="deliveries and failures per minute over the last hour">
<rect x="0" y="0" width="{{ chart.width }}" height="{{ chart.height }}" fill="#fafafa"
      stroke="#ddd"/>
{% for bar in chart.bars %}
<rect x="{{ bar.x }}" y="{{ bar.y }}" width="{{ bar.w }}" height="{{ bar.h }}"
      fill="#7aa7d8"><title>{{ bar.label }}</title></rect>
{% if bar.fh %}<rect x="{{ bar.x }}" y="{{ bar.fy }}" width="{{ bar.w }}"
      height="{{ bar.fh }}" fill="#d9534f"><title>{{ bar.label }}</title></rect>{% endif %}
{% endfor %}
<text x="4" y="12" font-size="10">max {{ chart.peak }}/min</text>
<text x="4" y="{{ chart.height - 4 }}" font-size="10">{{ chart.first }}</text>
<text x="{{ chart.width - 4 }}" y="{{ chart.height - 4 }}" font-size="10"
      text-anchor="end">{{ chart.last }} UTC</text>
</svg>
<p class="note"><span style="color:#7aa7d8">&#9632;</span> deliveries (by the minute their
event was stored)
{% if history %}<span class="failures">&#9632;</span> failed attempts (by the minute they
failed).{% else %}<span class="failures">&#9632;</span> of them now retrying or dead.{% endif %}</p>
{% endblock %}
"""

_EVENTS = """{% extends "base.html" %}
{% block title %}Events{% endblock %}
{% block body %}
<h1>Events</h1>
<form method="get" action="{{ url_for('events') }}">
<label>Event id starts with <input name="id" value="{{ f.id_prefix }}"></label>
<label>Name <input name="name" value="{{ f.name }}"></label>
<label>Handler <input name="handler" value="{{ f.handler }}"></label>
<label>State <select name="state"><option value="">any</option>
{% for s in states %}<option{% if s == f.state %} selected{% endif %}>{{ s }}</option>
{% endfor %}</select></label>
<label>Stored from <input type="datetime-local" name="since" value="{{ since }}"></label>
<label>until <input type="datetime-local" name="until" value="{{ until }}"></label>
<span class="note">(UTC)</span>
<button type="submit">Search</button>
</form>
{% if rows %}
<table>
<thead><tr><th>Stored (UTC)</th><th>Event id</th><th>Name</th><th>Deliveries</th></tr></thead>
<tbody>
{% for r in rows %}
<tr><td>{{ r.stored_at|utc }}</td>
<td><a href="{{ url_for('event', event_id=r.id) }}">{{ r.id }}</a></td>
<td>{{ r.name }}</td>
<td>{% for s, n in r.states|dictsort %}<span class="{{ s }}">{{ s }}: {{ n }}</span> {% endfor %}
</td></tr>
{% endfor %}
</tbody>
</table>
{% else %}
<p>No event matches.</p>
{% endif %}
{% include "pages.html" %}
{% endblock %}
"""

_PAGES = """<p>
{% if page > 1 %}<a href="{{ url_for(request.endpoint, page=page - 1, **query) }}">&larr; newer</a>
{% endif %}
<span class="note">page {{ page }}</span>
{% if more %}<a href="{{ url_for(request.endpoint, page=page + 1, **query) }}">older &rarr;</a>
{% endif %}
</p>
"""

_EVENT = """{% extends "base.html" %}
{% block title %}Event {{ e.id }}{% endblock %}
{% block body %}
<h1>Event <code>{{ e.id }}</code></h1>
<table>
<tr><th>Name</th><td>{{ e.name }}</td></tr>
<tr><th>Occurred at</th><td>{{ e.occurred_at }}</td></tr>
<tr><th>Stored at</th><td>{{ e.stored_at|utc }} UTC</td></tr>
<tr><th>Payload type</th><td>{{ e.payload_type or "(plain JSON)" }}</td></tr>
</table>
<h2>Deliveries</h2>
<table>
<thead><tr><th>Handler</th><th>State</th><th>Attempts</th><th>Last error</th></tr></thead>
<tbody>
{% for d in e.deliveries %}
<tr><td>{{ d.handler }}</td><td class="{{ d.state }}">{{ d.state }}</td>
<td class="n">{{ d.attempts }}</td><td>{{ d.error or "-" }}</td></tr>
{% endfor %}
</tbody>
</table>
<h2>Failed attempts</h2>
{% if not e.history %}
<p class="note">This store predates the attempt history (schema version 1): open it once with
eventbus to add it. Each delivery's attempt count and last error are above.</p>
{% elif e.failures %}
<table>
<thead><tr><th>Handler</th><th>Attempt</th><th>Failed at</th><th>Error</th></tr></thead>
<tbody>
{% for f in e.failures %}
<tr><td>{{ f.handler }}</td><td class="n">{{ f.attempt }}</td>
<td>{{ f.failed_at|utc }} UTC</td><td>{{ f.error }}</td></tr>
{% endfor %}
</tbody>
</table>
{% else %}
<p class="note">No attempt failed.</p>
{% endif %}
<p class="note">Successful attempts are counted, not kept one by one.</p>
{% for x in e.dead_letters %}
<h2 id="dead-letter-{{ x.id }}">Dead letter <code>{{ x.id }}</code> ({{ x.handler }})</h2>
{% include "letter.html" %}
{% endfor %}
<h2>Payload</h2>
<pre>{{ e.payload }}</pre>
<h2>Metadata</h2>
<pre>{{ e.metadata }}</pre>
<p class="note">Values of secret-looking keys are redacted as in the logs.</p>
{% endblock %}
"""

_LETTER = """<table>
<tr><th>Event</th><td><a href="{{ url_for('event', event_id=x.event_id) }}">{{ x.event_id }}</a>
{{ x.event_name or "" }}</td></tr>
<tr><th>Handler</th><td>{{ x.handler }}</td></tr>
<tr><th>Attempts</th><td>{{ x.attempts }}</td></tr>
<tr><th>Reason</th><td>{{ x.reason }}</td></tr>
<tr><th>Failed at</th><td>{{ x.failed_at }}</td></tr>
<tr><th>Error</th><td class="dead">{{ x.error }}</td></tr>
</table>
<h3>Traceback</h3>
<pre>{{ x.traceback or "(none recorded)" }}</pre>
<form class="inline" method="post" action="{{ url_for('replay') }}">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<input type="hidden" name="id" value="{{ x.id }}">
<button type="submit">Replay</button></form>
<form class="inline" method="post" action="{{ url_for('purge') }}">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<input type="hidden" name="id" value="{{ x.id }}">
<button type="submit">Purge</button></form>
"""

_DEAD_LETTER = """{% extends "base.html" %}
{% block title %}Dead letter {{ x.id }}{% endblock %}
{% block body %}
<h1>Dead letter <code>{{ x.id }}</code></h1>
{% include "letter.html" %}
{% endblock %}
"""

_DEAD_LETTERS = """{% extends "base.html" %}
{% block title %}Dead letters{% endblock %}
{% block body %}
<h1>Dead letters</h1>
<form method="get" action="{{ url_for('dead_letters') }}">
<label>Handler <input name="handler" value="{{ f.handler }}"></label>
<label>Event name <input name="name" value="{{ f.name }}"></label>
<label>Event id starts with <input name="event_id" value="{{ f.event_id_prefix }}"></label>
<button type="submit">Filter</button>
</form>
<p class="note">Replay makes a delivery pending again for a running service (after
<code>recover()</code>) or its next start; purge deletes the dead letter, the delivery stays
dead.</p>
{% if rows %}
<form method="post" action="{{ url_for('replay') }}">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<table>
<thead><tr><th></th><th>Dead letter</th><th>Failed at</th><th>Event</th><th>Handler</th>
<th>Attempts</th><th>Reason</th><th>Error</th></tr></thead>
<tbody>
{% for x in rows %}
<tr><td><input type="checkbox" name="id" value="{{ x.id }}" aria-label="select {{ x.id }}"></td>
<td><a href="{{ url_for('dead_letter', letter_id=x.id) }}">{{ x.id }}</a></td>
<td>{{ x.failed_at }}</td>
<td><a href="{{ url_for('event', event_id=x.event_id) }}">{{ x.event_name or x.event_id }}</a></td>
<td>{{ x.handler }}</td><td class="n">{{ x.attempts }}</td><td>{{ x.reason }}</td>
<td class="dead">{{ x.error|truncate(200) }}</td></tr>
{% endfor %}
</tbody>
</table>
<button type="submit">Replay selected</button>
<button type="submit" formaction="{{ url_for('purge') }}">Purge selected</button>
</form>
<fieldset><legend>Every dead letter matching the filter</legend>
{% for action, label in (("replay", "Replay all matching"), ("purge", "Purge all matching")) %}
<form class="inline" method="post" action="{{ url_for(action) }}">
<input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
<input type="hidden" name="all" value="1">
<input type="hidden" name="handler" value="{{ f.handler }}">
<input type="hidden" name="name" value="{{ f.name }}">
<input type="hidden" name="event_id" value="{{ f.event_id_prefix }}">
<button type="submit">{{ label }}</button></form>
{% endfor %}
</fieldset>
{% else %}
<p>No dead letters{% if query %} match{% endif %}.</p>
{% endif %}
{% include "pages.html" %}
{% endblock %}
"""

_ERROR = """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block body %}
<h1>{{ title }}</h1>
<p>{{ detail }}</p>
{% endblock %}
"""

TEMPLATES: dict[str, str] = {
    "base.html": _BASE,
    "overview.html": _OVERVIEW,
    "events.html": _EVENTS,
    "pages.html": _PAGES,
    "event.html": _EVENT,
    "letter.html": _LETTER,
    "dead_letter.html": _DEAD_LETTER,
    "dead_letters.html": _DEAD_LETTERS,
    "error.html": _ERROR,
}
