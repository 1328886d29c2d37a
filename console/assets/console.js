// Backflow's web console: fills the page shells the daemon renders (console/src/web.rs) from its
// JSON API, and keeps them current. Hand-written, no dependencies, no build step.
//
// Every value from the API reaches the page as text (text nodes, textContent, attributes set one
// by one), never as HTML. Requests that change something carry the CSRF value the page was
// rendered with (<meta name="csrf">) in the X-Backflow-CSRF header.

const CSRF = document.querySelector('meta[name="csrf"]')?.content ?? '';
const OPERATOR = document.querySelector('meta[name="role"]')?.content === 'operator';
const PAGE = document.body.dataset.page;
/// How often the dashboard reads the API again, in milliseconds.
const REFRESH_MS = 3000;
/// How often an action's task is polled.
const TASK_POLL_MS = 1000;

// ---------------------------------------------------------------------------------------------
// Building elements

/// An element `tag` with `attrs` and `children` (strings become text nodes). Attributes:
/// `class`, `dataset` (an object), `on<event>` (a listener), `hidden`/`disabled` (booleans),
/// anything else set as an attribute (null and false leave it out).
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') {
      for (const [dk, dv] of Object.entries(v)) if (dv !== null && dv !== undefined) e.dataset[dk] = String(dv);
    } else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/// Replaces the content of the element `id` with `children`.
function fill(id, ...children) {
  const e = document.getElementById(id);
  if (!e) return;
  e.classList.remove('loading');
  e.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

function table(headings, rows, empty) {
  if (rows.length === 0) return h('p', { class: 'empty' }, empty);
  return h('table', null, h('thead', null, h('tr', null, headings.map((t) => h('th', null, t)))), h('tbody', null, rows));
}

/// A link inside the console to `path` + the encoded `segment`.
function link(path, segment, text) {
  return h('a', { href: path + encodeURIComponent(segment) }, text ?? segment);
}

/// A coloured word for a result: success, warning, cancelled, failure, running, ...
function badge(result) {
  if (!result) return h('span', { class: 'badge none' }, '—');
  return h('span', { class: `badge ${result}`, dataset: { result } }, result);
}

// ---------------------------------------------------------------------------------------------
// Formatting

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

function bytes(n) {
  let v = Number(n) || 0;
  let u = 0;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${u === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${UNITS[u]}`;
}

function mibPerSecond(bps) {
  return `${((Number(bps) || 0) / 1048576).toFixed(1)} MiB/s`;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(Number(seconds) || 0));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function now() {
  return Date.now() / 1000;
}

/// "3 h ago", "in 5 min", "just now".
function relative(unix) {
  if (unix === null || unix === undefined) return 'never';
  const d = unix - now();
  const a = Math.abs(d);
  let text;
  if (a < 45) return d < 0 ? 'just now' : 'in a moment';
  if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400 * 2) text = `${Math.round(a / 3600)} h`;
  else text = `${Math.round(a / 86400)} d`;
  return d < 0 ? `${text} ago` : `in ${text}`;
}

/// A time in UTC, as the jobs' schedules are written.
function utc(unix) {
  if (unix === null || unix === undefined) return '—';
  return `${new Date(unix * 1000).toISOString().slice(0, 19).replace('T', ' ')} UTC`;
}

/// A <time> showing the age, with the exact time as its title.
function when(unix) {
  if (unix === null || unix === undefined) return h('span', { class: 'never' }, 'never');
  return h('time', { datetime: new Date(unix * 1000).toISOString(), title: utc(unix), dataset: { unix } }, relative(unix));
}

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function answer(response) {
  if (response.status === 401) {
    window.location.assign('/login');
    throw new ApiError(401, 'unauthorized', 'not logged in');
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(response.status, 'internal', `${response.status}: ${text.slice(0, 200)}`);
  }
  if (!response.ok) {
    const e = body?.error ?? {};
    throw new ApiError(response.status, e.code ?? 'internal', e.message ?? `${response.status}`);
  }
  return body;
}

async function get(path) {
  return answer(await fetch(path, { credentials: 'same-origin', headers: { Accept: 'application/json' } }));
}

async function post(path, body) {
  const headers = { 'X-Backflow-CSRF': CSRF, Accept: 'application/json' };
  const init = { method: 'POST', credentials: 'same-origin', headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  return answer(await fetch(path, init));
}

/// A message at the top of the page (`kind`: ok or error).
function flash(kind, text) {
  const e = document.getElementById('flash');
  if (!e) return;
  e.replaceChildren(h('p', { class: `flash ${kind}` }, text));
}

/// Runs `action` (a promise-making function) for a button: disabled while it runs, its outcome
/// flashed.
async function act(button, action, done) {
  button.disabled = true;
  try {
    const result = await action();
    flash('ok', done(result));
  } catch (e) {
    flash('error', e.message);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// The dashboard

function vmRows(vms) {
  return vms.map((v) =>
    h(
      'tr',
      { class: 'vm', dataset: { vm: v.vm, result: v.last_result } },
      h('td', { class: 'name' }, link('/vms/', v.vm)),
      h('td', null, v.job),
      h('td', { class: 'age', dataset: { unix: v.last_success } }, when(v.last_success)),
      h('td', { class: 'result' }, badge(v.last_result), v.last_error ? h('div', { class: 'error small' }, v.last_error) : null),
      h('td', { class: 'num' }, v.last_success ? bytes(v.last_size) : '—'),
      h('td', { class: 'num points' }, String(v.restore_points)),
    ),
  );
}

function jobButtons(job) {
  if (!OPERATOR) return h('span', { class: 'muted' }, 'read-only');
  const busy = job.running || job.requested_by;
  return [
    h(
      'button',
      {
        class: 'run-now primary',
        dataset: { job: job.name },
        disabled: busy ? true : false,
        onclick: (ev) =>
          act(ev.currentTarget, () => post(`/api/jobs/${encodeURIComponent(job.name)}/run`), () => `Run of ${job.name} requested.`).then(refreshDashboard),
      },
      job.running ? 'Running…' : job.requested_by ? 'Requested' : 'Run now',
    ),
    ' ',
    h(
      'button',
      {
        class: job.enabled ? 'disable' : 'enable',
        dataset: { job: job.name },
        onclick: (ev) => {
          const what = job.enabled ? 'disable' : 'enable';
          act(ev.currentTarget, () => post(`/api/jobs/${encodeURIComponent(job.name)}/${what}`), () => `${job.name}: ${what}d.`).then(refreshDashboard);
        },
      },
      job.enabled ? 'Disable' : 'Enable',
    ),
  ];
}

function jobRows(jobs) {
  return jobs.map((j) => {
    const last = j.last_session;
    return h(
      'tr',
      { class: 'job', dataset: { job: j.name, enabled: j.enabled, running: j.running } },
      h('td', { class: 'name' }, j.name, j.running ? h('span', { class: 'badge running' }, 'running') : null),
      h('td', null, j.kind),
      h('td', { class: 'enabled' }, j.enabled ? 'yes' : h('span', { class: 'muted' }, 'no')),
      h(
        'td',
        { class: 'next', title: j.schedule.join('\n') },
        j.next_runs.length ? j.next_runs.map((t, i) => h('div', { class: i ? 'muted small' : null }, when(t))) : h('span', { class: 'muted' }, j.schedule.length ? 'not scheduled' : 'no schedule'),
      ),
      h('td', { class: 'last' }, last ? [badge(last.result), ' ', link('/sessions/', last.id, relative(last.ended))] : h('span', { class: 'muted' }, 'never run')),
      h('td', { class: 'actions' }, jobButtons(j)),
    );
  });
}

function sessionRows(sessions) {
  return sessions.map((s) =>
    h(
      'tr',
      { class: 'session', dataset: { session: s.id, job: s.job, result: s.result } },
      h('td', null, link('/sessions/', s.id)),
      h('td', null, s.job),
      h('td', null, s.action ?? s.kind),
      h('td', null, when(s.started)),
      h('td', { class: 'num' }, duration(s.ended - s.started)),
      h('td', null, badge(s.result), s.error ? h('div', { class: 'error small' }, s.error) : null),
      h('td', { class: 'num' }, s.vms_failed ? `${s.vms} (${s.vms_failed} failed)` : String(s.vms)),
      h('td', { class: 'num' }, bytes(s.bytes_read)),
      h('td', { class: 'num' }, bytes(s.bytes_written)),
      h('td', { class: 'requested-by' }, s.requested_by ?? '—'),
    ),
  );
}

function maintenance(run) {
  if (!run) return h('span', { class: 'muted' }, 'never');
  return [badge(run.result), ' ', link('/sessions/', run.session, relative(run.ended)), run.error ? h('div', { class: 'error small' }, run.error) : null];
}

function repositoryRows(repos) {
  return repos.map((r) =>
    h(
      'tr',
      { class: 'repository', dataset: { location: r.location } },
      h('td', null, r.location, r.error ? h('div', { class: 'error small' }, r.error) : null),
      h('td', null, r.jobs.join(', ')),
      h('td', { class: 'num' }, String(r.snapshots)),
      h('td', { class: 'num' }, bytes(r.logical_bytes)),
      h('td', { class: 'num' }, bytes(r.stored_bytes)),
      h('td', { class: 'num dedup' }, `${Number(r.deduplication_ratio).toFixed(2)}×`),
      h('td', null, maintenance(r.last_gc)),
      h('td', null, maintenance(r.last_health_check)),
    ),
  );
}

let dashboardTimer = null;

async function refreshDashboard() {
  clearTimeout(dashboardTimer);
  try {
    const [vms, jobs, sessions, repos, runs] = await Promise.all([
      get('/api/vms'),
      get('/api/jobs'),
      get('/api/sessions?limit=20'),
      get('/api/repositories'),
      get('/api/pipelines'),
    ]);
    fill('vms', table(['VM', 'Job', 'Last successful backup', 'Last result', 'Size', 'Restore points'], vmRows(vms), 'No VMs in the backup jobs.'));
    fill('jobs', table(['Job', 'Kind', 'Enabled', 'Next runs', 'Last session', ''], jobRows(jobs), 'No jobs.'));
    fill('sessions', table(['Session', 'Job', 'Kind', 'Started', 'Duration', 'Result', 'VMs', 'Read', 'Written', 'Asked by'], sessionRows(sessions), 'No sessions yet.'));
    fill('repositories', table(['Repository', 'Jobs', 'Restore points', 'Logical', 'Stored', 'Dedup', 'Last gc', 'Last health check'], repositoryRows(repos), 'No repositories.'));
    const running = runs.filter((r) => r.ended === null || r.ended === undefined);
    const live = document.getElementById('live-link');
    live.hidden = running.length === 0;
    live.replaceChildren(
      h('span', { class: 'badge running' }, 'running'),
      ' ',
      h('a', { href: '/pipelines' }, `${running.length} pipeline${running.length === 1 ? '' : 's'} running (${running.map((r) => r.target).join(', ')}): watch live`),
    );
    document.getElementById('updated').textContent = new Date().toLocaleTimeString();
  } catch (e) {
    flash('error', `Cannot read the API: ${e.message}`);
  }
  dashboardTimer = setTimeout(refreshDashboard, REFRESH_MS);
}

// ---------------------------------------------------------------------------------------------
// A session

function definition(items) {
  return items.flatMap(([term, value]) => (value === null || value === undefined ? [] : [h('dt', null, term), h('dd', null, value)]));
}

function list(cls, items) {
  if (!items || items.length === 0) return null;
  return h('ul', { class: cls }, items.map((t) => h('li', null, t)));
}

async function showSession() {
  const id = document.body.dataset.id;
  try {
    const detail = await get(`/api/sessions/${encodeURIComponent(id)}`);
    const s = detail.session;
    fill(
      'summary',
      definition([
        ['Job', s.job],
        ['Kind', s.action ?? s.kind],
        ['Result', badge(s.result)],
        ['Asked by', h('span', { id: 'requested-by' }, s.requested_by ?? 'the command line')],
        ['Started', utc(s.started)],
        ['Ended', utc(s.ended)],
        ['Duration', duration(s.ended - s.started)],
        ['Repository', s.repository],
        ['Read', bytes(s.bytes_read)],
        ['Written', bytes(s.bytes_written)],
        ['Error', s.error ? h('span', { class: 'error' }, s.error) : null],
      ]),
    );
    const rows = detail.vms.map((v) =>
      h(
        'tr',
        { class: 'vm-result', dataset: { vm: v.vm, result: v.result } },
        h('td', null, link('/vms/', v.vm)),
        h('td', { class: 'result' }, badge(v.result)),
        h('td', { class: 'num' }, bytes(v.bytes_read)),
        h('td', { class: 'num' }, bytes(v.bytes_written)),
        h('td', { class: 'num' }, duration(v.seconds)),
        h('td', { class: 'bottleneck' }, v.bottleneck ?? '—'),
        h('td', null, v.snapshot ?? '—', v.worker_host ? h('div', { class: 'muted small' }, `on ${v.worker_host}`) : null),
        h(
          'td',
          { class: 'messages' },
          v.error ? h('div', { class: 'error' }, v.error) : null,
          list('warnings', v.warnings),
          list('notes', v.notes),
        ),
      ),
    );
    fill('results', table(['VM', 'Result', 'Read', 'Written', 'Duration', 'Bottleneck', 'Restore point', 'Messages'], rows, 'No VMs in this session.'));
  } catch (e) {
    fill('summary', h('p', { class: 'error' }, e.message));
    fill('results');
  }
}

// ---------------------------------------------------------------------------------------------
// A VM's restore points

/// Asks with the page's <dialog>: resolves to null (cancelled), true (confirmed) or the text
/// typed (when `input` is given as its label).
function ask(text, input) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  const label = document.getElementById('confirm-label');
  const field = document.getElementById('confirm-input');
  label.hidden = !input;
  field.required = Boolean(input);
  field.value = input ?? '';
  return new Promise((resolve) => {
    dialog.addEventListener(
      'close',
      () => {
        if (dialog.returnValue !== 'ok') resolve(null);
        else resolve(input ? field.value.trim() : true);
      },
      { once: true },
    );
    dialog.returnValue = '';
    dialog.showModal();
  });
}

const tasks = new Map();

function renderTasks() {
  const rows = [...tasks.values()]
    .sort((a, b) => b.id - a.id)
    .map((t) =>
      h(
        'tr',
        { class: 'task', dataset: { task: t.id, state: t.state } },
        h('td', null, `#${t.id}`),
        h('td', null, t.kind),
        h('td', null, t.snapshot),
        h('td', null, t.target ?? '—'),
        h('td', { class: 'state' }, badge(t.state)),
        h('td', null, t.requested_by),
        h('td', null, t.session ? link('/sessions/', t.session) : '—'),
        h('td', { class: 'messages' }, t.error ? h('div', { class: 'error' }, t.error) : null, t.output ? h('pre', null, t.output) : null),
      ),
    );
  fill('tasks', table(['Task', 'Action', 'Restore point', 'Target', 'State', 'Asked by', 'Session', 'Output'], rows, 'No actions asked for on this page.'));
}

async function follow(task) {
  tasks.set(task.id, task);
  renderTasks();
  while (task.state === 'running') {
    await new Promise((r) => setTimeout(r, TASK_POLL_MS));
    try {
      task = await get(`/api/tasks/${task.id}`);
    } catch (e) {
      flash('error', `Task ${task.id}: ${e.message}`);
      return;
    }
    tasks.set(task.id, task);
    renderTasks();
  }
  flash(task.state === 'succeeded' ? 'ok' : 'error', `${task.kind} of ${task.snapshot}: ${task.state}${task.error ? `: ${task.error}` : ''}`);
  showVm();
}

function pointPath(p, what) {
  return `/api/restore-points/${encodeURIComponent(p.id)}/${what}?repository=${encodeURIComponent(p.repository)}`;
}

function pointActions(p) {
  if (!OPERATOR) return h('span', { class: 'muted' }, 'read-only');
  const start = (button, what, body) => act(button, () => post(pointPath(p, what), body), (a) => (follow(a.task), `${what} of ${p.id}: task #${a.task.id} started.`));
  return [
    h('button', { class: 'verify', dataset: { point: p.id }, onclick: (ev) => start(ev.currentTarget, 'verify') }, 'Verify'),
    ' ',
    h(
      'button',
      {
        class: 'restore',
        dataset: { point: p.id },
        onclick: async (ev) => {
          const button = ev.currentTarget;
          const name = await ask(`Restore the disks of ${p.id} into a new directory of the daemon's restore directory:`, `${p.vm}-${p.id}`.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64));
          if (name) start(button, 'restore', { name });
        },
      },
      'Restore',
    ),
    ' ',
    h(
      'button',
      {
        class: 'forget danger',
        dataset: { point: p.id },
        onclick: async (ev) => {
          const button = ev.currentTarget;
          if (await ask(`Forget restore point ${p.id} of ${p.vm} (${utc(p.time)})? Its data goes at the next gc.`)) start(button, 'forget');
        },
      },
      'Forget',
    ),
  ];
}

async function showVm() {
  const name = document.body.dataset.vm;
  try {
    const [vms, points] = await Promise.all([get('/api/vms'), get(`/api/restore-points?vm=${encodeURIComponent(name)}`)]);
    const mine = vms.filter((v) => v.vm === name);
    fill(
      'summary',
      mine.length === 0
        ? [h('dt', null, 'Jobs'), h('dd', { class: 'muted' }, 'in no backup job now')]
        : mine.flatMap((v) =>
            definition([
              ['Job', v.job],
              ['Repository', v.repository],
              ['Last successful backup', [when(v.last_success), v.last_success ? ` (${utc(v.last_success)})` : '']],
              ['Last result', [badge(v.last_result), v.last_error ? h('span', { class: 'error' }, ` ${v.last_error}`) : '']],
              ['Size', v.last_success ? bytes(v.last_size) : null],
            ]),
          ),
    );
    const rows = points.map((p) =>
      h(
        'tr',
        { class: 'point', dataset: { point: p.id } },
        h('td', { class: 'id' }, p.id),
        h('td', null, utc(p.time)),
        h('td', { class: 'num' }, bytes(p.size)),
        h('td', null, p.disks.map((d) => `${d.name} (${bytes(d.size)})`).join(', ')),
        h('td', null, p.hostname),
        h('td', null, p.repository),
        h('td', { class: 'actions' }, pointActions(p)),
      ),
    );
    fill('points', table(['Restore point', 'Time', 'Size', 'Disks', 'Host', 'Repository', ''], rows, 'No restore points.'));
    if (tasks.size === 0) renderTasks();
  } catch (e) {
    fill('points', h('p', { class: 'error' }, e.message));
  }
}

// ---------------------------------------------------------------------------------------------
// Live pipelines

function percent(part, whole) {
  return whole > 0 ? Math.min(100, Math.max(0, (100 * part) / whole)) : 0;
}

/// A bar filled to `pct` percent.
function bar(cls, pct) {
  const fillEl = h('span', { class: 'fill' });
  fillEl.style.width = `${pct.toFixed(1)}%`;
  return h('span', { class: `bar ${cls}` }, fillEl);
}

function stageBox(run, s) {
  const isBottleneck = run.bottleneck === s.name && run.ended == null;
  return h(
    'div',
    {
      class: `stage${isBottleneck ? ' bottleneck' : ''}${s.active === 0 ? ' done' : ''}`,
      dataset: { stage: s.name, kind: s.kind },
      title: `busy ${s.busy_seconds.toFixed(1)} s, starved ${s.starved_seconds.toFixed(1)} s, backpressured ${s.backpressured_seconds.toFixed(1)} s`,
    },
    h('div', { class: 'stage-name' }, s.name),
    h('div', { class: 'muted small' }, s.kind === s.name ? `${s.workers} worker${s.workers === 1 ? '' : 's'}` : `${s.kind} · ${s.workers} worker${s.workers === 1 ? '' : 's'}`),
    h('div', { class: 'throughput', dataset: { bytesPerSecond: s.bytes_per_second } }, mibPerSecond(s.bytes_per_second)),
    h('div', { class: 'items', dataset: { itemsIn: s.items_in, itemsOut: s.items_out } }, `${s.items_in} in · ${s.items_out} out`),
    h('div', { class: 'small' }, `${bytes(Math.max(s.bytes_in, s.bytes_out))}`),
    h(
      'div',
      { class: 'utilisation', dataset: { utilisation: s.utilisation }, title: 'share of its workers\u2019 time spent working' },
      bar('busy', 100 * s.utilisation),
      ` ${Math.round(100 * s.utilisation)}% busy`,
    ),
    isBottleneck ? h('div', { class: 'tag' }, 'bottleneck') : null,
  );
}

function channel(s) {
  return h(
    'div',
    { class: 'channel', dataset: { into: s.name, queued: s.queued, capacity: s.capacity }, title: `${s.queued} of ${s.capacity} items queued into ${s.name}` },
    h('div', { class: 'arrow' }, '→'),
    bar('queue', percent(s.queued, s.capacity)),
    h('div', { class: 'small' }, `${s.queued}/${s.capacity}`),
  );
}

function runView(run) {
  const running = run.ended == null;
  const stages = [];
  run.stages.forEach((s, i) => {
    if (i > 0) stages.push(channel(s));
    stages.push(stageBox(run, s));
  });
  return h(
    'section',
    { class: `run ${running ? 'running' : 'ended'}`, id: `run-${run.id}`, dataset: { run: run.id, job: run.job, target: run.target, state: running ? 'running' : 'ended', bottleneck: running ? run.bottleneck : null } },
    h(
      'h2',
      null,
      run.target,
      ' ',
      h('span', { class: 'muted' }, `job ${run.job} · ${run.pipeline}`),
      ' ',
      running ? badge('running') : badge(run.outcome),
    ),
    h(
      'div',
      { class: 'progress' },
      bar('done', percent(run.bytes_done, run.bytes_planned)),
      ` ${bytes(run.bytes_done)}${run.bytes_planned ? ` of ${bytes(run.bytes_planned)}` : ''} · ${duration(run.elapsed_seconds)}`,
      running && run.bottleneck ? [' · bottleneck: ', h('strong', { class: 'bottleneck-name' }, run.bottleneck)] : null,
      running ? null : ` · ended ${relative(run.ended)}`,
    ),
    h('div', { class: 'stages' }, stages),
  );
}

function renderRuns(runs) {
  // Running first, then ended; newest first in each.
  const ordered = [...runs].sort((a, b) => (a.ended == null ? 0 : 1) - (b.ended == null ? 0 : 1) || b.id - a.id);
  fill('runs', ordered.length ? ordered.map(runView) : h('p', { class: 'empty' }, 'No pipeline runs now, nor in the last ten minutes.'));
}

function livePipelines() {
  const state = document.getElementById('stream-state');
  const source = new EventSource('/api/pipelines/events');
  source.addEventListener('open', () => {
    state.textContent = 'Live';
    state.className = 'live';
  });
  source.addEventListener('pipelines', (ev) => {
    try {
      renderRuns(JSON.parse(ev.data));
      state.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      flash('error', `A bad event: ${e.message}`);
    }
  });
  source.addEventListener('error', () => {
    // EventSource reconnects by itself; a logged-out browser goes to the login page.
    state.textContent = 'Reconnecting…';
    state.className = 'stale';
    fetch('/api/pipelines', { credentials: 'same-origin' }).then((r) => {
      if (r.status === 401) window.location.assign('/login');
    }, () => {});
  });
}

// ---------------------------------------------------------------------------------------------

document.getElementById('logout')?.addEventListener('click', async () => {
  await fetch('/logout', { method: 'POST', credentials: 'same-origin', headers: { 'X-Backflow-CSRF': CSRF } }).catch(() => {});
  window.location.assign('/login');
});

switch (PAGE) {
  case 'dashboard':
    refreshDashboard();
    break;
  case 'session':
    showSession();
    break;
  case 'vm':
    showVm();
    break;
  case 'pipelines':
    livePipelines();
    break;
  default:
    break;
}
