// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.

// alloc-page.mjs ALLOC_ID OUT_PNG [TASK]
//
// Opens the Nomad UI's page of an allocation in Debian's Chromium (driven by playwright-core) and
// checks what a user sees there:
//   - the allocation and its task TASK (default "web") are shown as running;
//   - the task's row in the "Tasks" table has non-zero CPU and memory bars;
//   - the "Resource Utilization" section shows non-zero CPU (MHz/GHz) and memory (MiB/...) as
//     numbers and bars, and both line charts have drawn a few samples above zero;
//   - the task's page, reached by clicking the task, lists the driver's readiness event
//     ("Driver" / "Machine is ready: ...") under "Recent Events".
// Full-page screenshots: OUT_PNG (the allocation page) and OUT_PNG with "-task.png" in place of
// ".png" (the task page). On a failed check the script still saves the page it was on, at the
// path of the page being checked, plus its DOM next to it (".html"), and exits 1 with a message
// saying what it waited for and what it last saw.
//
// CPU is only non-zero while the guest works: keep something busy in it during the check.
// Environment: NOMAD_ADDR (default http://127.0.0.1:4646), UI_TIMEOUT_SECONDS (default 60, per
// check), CHROMIUM (default /usr/bin/chromium). e2e/ui/setup.sh installs what this needs.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [allocID, outPNG, task = 'web'] = process.argv.slice(2);
if (!allocID || !outPNG) {
  console.error('usage: node alloc-page.mjs ALLOC_ID OUT_PNG [TASK]');
  process.exit(2);
}
const addr = (process.env.NOMAD_ADDR || 'http://127.0.0.1:4646').replace(/\/+$/, '');
const timeoutMs = 1000 * Number(process.env.UI_TIMEOUT_SECONDS || 60);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const taskPNG = outPNG.replace(/(\.png)?$/i, '-task.png');

class CheckFailed extends Error {}

const t0 = Date.now();
const log = (msg) => console.log(`ui: [${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// until polls probe() (which returns [ok, whatItSaw]) until ok, or fails with what it last saw.
// The UI long-polls and refreshes stats every few seconds, so values arrive over time.
async function until(what, probe) {
  const deadline = Date.now() + timeoutMs;
  let seen = '(nothing yet)';
  for (;;) {
    try {
      const [ok, s] = await probe();
      seen = s;
      if (ok) return s;
    } catch (e) {
      seen = `error: ${e.message.split('\n')[0]}`;
    }
    if (Date.now() >= deadline) {
      throw new CheckFailed(`${what}: not seen within ${timeoutMs / 1000}s; last seen: ${typeof seen === 'string' ? seen : JSON.stringify(seen)}`);
    }
    await sleep(500);
  }
}

// Runs in the page: the table of the boxed section headed `head`, as header texts and cell texts;
// a cell holding an inline chart gives its tooltip (aria-label, e.g. "2.46 GHz / 200 MHz") and
// its progress value too.
function readSectionTable(head) {
  const norm = (s) => (s || '').replace(/\s+/g, ' ').trim();
  const section = [...document.querySelectorAll('.boxed-section')]
    .find((s) => norm(s.querySelector('.boxed-section-head')?.textContent) === head);
  const table = section?.querySelector('table');
  if (!table) return null;
  const headers = [...table.querySelectorAll('thead th')].map((th) => norm(th.textContent));
  const rows = [...table.querySelectorAll('tbody tr')].map((tr) => {
    const row = {};
    [...tr.children].forEach((td, i) => {
      const chart = td.querySelector('.inline-chart');
      row[headers[i] || `#${i}`] = chart
        ? { label: norm(chart.getAttribute('aria-label')), value: Number(chart.querySelector('progress')?.value) }
        : norm(td.textContent);
    });
    return row;
  });
  return { headers, rows };
}

// Runs in the page: the primary metrics (CPU, Memory) of the "Resource Utilization" section.
function readUtilization() {
  const norm = (s) => (s || '').replace(/\s+/g, ' ').trim();
  const section = [...document.querySelectorAll('.boxed-section')]
    .find((s) => norm(s.querySelector('.boxed-section-head')?.textContent) === 'Resource Utilization');
  if (!section) return null;
  // The line chart: how many samples its line has, and the top of its Y range, which its
  // accessible description gives ("X-axis values range from ... and Y-axis values range from
  // 0% to 1310%.").
  const chart = (svg) => {
    if (!svg) return null;
    const d = svg.querySelector('path.line')?.getAttribute('d') || '';
    const y = /Y-axis values range from (\S+) to ([\d.,]+)/.exec(norm(svg.querySelector('desc')?.textContent));
    return { points: (d.match(/[ML]/g) || []).length, yMax: y ? Number(y[2].replace(/,/g, '')) : NaN };
  };
  const out = {};
  for (const m of section.querySelectorAll('.primary-metric')) {
    out[norm(m.querySelector('h4.title')?.textContent)] = {
      used: norm(m.querySelector('.annotation strong')?.textContent), // "2,464 MHz", "6 MiB"
      annotation: norm(m.querySelector('.annotation')?.textContent), // "... / 200 MHz Total"
      percent: norm(m.querySelector('.secondary-graphic .nowrap')?.textContent),
      bar: Number(m.querySelector('.secondary-graphic progress')?.value),
      chart: chart(m.querySelector('.primary-graphic .line-chart svg')),
    };
  }
  return out;
}

// Runs in the page: the page's title (h1) and the status tag in it. The allocation page has
// <h1 class="title"><div>Allocation job.group[0] <span class="tag">running</span></div>buttons</h1>,
// the task page <h1 class="hds-page-header__title">web <span class="tag">running</span></h1>.
function readTitle() {
  const norm = (s) => (s || '').replace(/\s+/g, ' ').trim();
  const tag = document.querySelector('section.section h1 .tag');
  const head = tag?.parentElement;
  if (!head) return null;
  const title = [...head.childNodes].filter((n) => n !== tag).map((n) => n.textContent).join(' ');
  return { title: norm(title), status: norm(tag?.textContent) };
}

// "2,464 MHz" -> {n: 2464, unit: "MHz"}; null when the text is no quantity.
function quantity(text) {
  const m = /^([\d][\d,]*(?:\.\d+)?)\s*([A-Za-z]+)$/.exec(text || '');
  return m ? { n: Number(m[1].replace(/,/g, '')), unit: m[2] } : null;
}
const nonZero = (text, units) => {
  const q = quantity(text);
  return !!q && q.n > 0 && units.includes(q.unit);
};
// Samples a chart's line must have before the screenshot (the UI adds one per stats poll).
const MIN_SAMPLES = 3;
const CPU_UNITS = ['Hz', 'KHz', 'MHz', 'GHz', 'THz'];
const MEM_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

async function screenshot(page, file) {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot: ${file}`);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomad-ui-chromium-'));
let context;
let page;
let current = outPNG; // the screenshot path of the page being checked
const pageErrors = [];
let rc = 0;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    // As root on a machine with a closed network: no sandbox, no GPU, and none of Chromium's
    // background connections (which this network refuses, many at a time).
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1280, height: 900 },
    timeout: timeoutMs,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeoutMs);
  page.on('pageerror', (e) => pageErrors.push(e.message));

  // The UI keeps long-polling requests open: never wait for the network to go idle.
  const url = `${addr}/ui/allocations/${allocID}`;
  log(`opening ${url}`);
  const resp = await page.goto(url, { waitUntil: 'domcontentloaded' });
  if (!resp || !resp.ok()) throw new CheckFailed(`GET ${url}: HTTP ${resp ? resp.status() : 'no response'}`);

  // 1. The allocation is running (the status tag next to "Allocation <job>.<group>[n]").
  const t = await until('the allocation page title with status "running"', async () => {
    const v = await page.evaluate(readTitle);
    return [!!v && v.title.startsWith('Allocation ') && v.status === 'running', v];
  });
  log(`title: ${t.title} [${t.status}]`);

  // 2. The "Tasks" table shows the task as running, with non-zero CPU and memory bars.
  const taskRow = async () => {
    const tbl = await page.evaluate(readSectionTable, 'Tasks');
    return tbl?.rows.find((x) => x.Name === task) ?? tbl;
  };
  await until(`task "${task}" in the Tasks table with state "running"`, async () => {
    const r = await taskRow();
    return [r?.Name === task && r.State === 'running', r];
  });
  const row = await until(`non-zero CPU and memory bars in the Tasks table's row of "${task}"`, async () => {
    const r = await taskRow();
    return [r?.Name === task && r.State === 'running' && r.CPU?.value > 0 && r.Memory?.value > 0, r];
  });
  log(`task row: ${row.Name} | ${row.State} | last event: ${row['Last Event']} | CPU ${row.CPU.label} | memory ${row.Memory.label}`);

  // 3. "Resource Utilization": CPU and memory in use, as numbers, bars and charts with a line of
  // a few samples above zero.
  const charted = (c) => !!c && c.points >= MIN_SAMPLES && c.yMax > 0;
  const u = await until(`non-zero CPU and memory under "Resource Utilization" (numbers, bars, charts of ${MIN_SAMPLES}+ samples)`, async () => {
    const v = await page.evaluate(readUtilization);
    const ok = !!v && !!v.CPU && !!v.Memory &&
      nonZero(v.CPU.used, CPU_UNITS) && v.CPU.bar > 0 && charted(v.CPU.chart) &&
      nonZero(v.Memory.used, MEM_UNITS) && v.Memory.bar > 0 && charted(v.Memory.chart);
    return [ok, v];
  });
  log(`Resource Utilization: CPU ${u.CPU.annotation} (${u.CPU.percent}, chart: ${u.CPU.chart.points} samples up to ${u.CPU.chart.yMax}%), ` +
    `memory ${u.Memory.annotation} (${u.Memory.percent}, chart: ${u.Memory.chart.points} samples up to ${u.Memory.chart.yMax}%)`);
  await screenshot(page, outPNG);

  // 4. The task's page, as a user reaches it: its "Recent Events" hold the driver's readiness.
  current = taskPNG;
  await page.locator('.boxed-section table tr.task-row td a', { hasText: new RegExp(`^\\s*${task.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`) }).first().click();
  await page.waitForURL(`**/ui/allocations/${allocID}/${encodeURIComponent(task)}`);
  const tt = await until(`the task page title "${task}" with status "running"`, async () => {
    const v = await page.evaluate(readTitle);
    return [!!v && v.title === task && v.status === 'running', v];
  });
  log(`task page: ${tt.title} [${tt.status}]`);
  const events = await until('the driver event "Machine is ready" under "Recent Events"', async () => {
    const tbl = await page.evaluate(readSectionTable, 'Recent Events');
    const rows = tbl?.rows ?? [];
    return [rows.some((e) => e.Type === 'Driver' && e.Description.startsWith('Machine is ready')), rows];
  });
  for (const e of events) log(`event: ${e.Time} | ${e.Type} | ${e.Description}`);
  await screenshot(page, taskPNG);
  log('all checks passed');
} catch (e) {
  rc = 1;
  console.error(`ui: FAILED: ${e instanceof CheckFailed ? e.message : e.stack || e}`);
  if (pageErrors.length) console.error(`ui: errors in the page:\n  ${pageErrors.join('\n  ')}`);
  if (page) {
    try {
      await screenshot(page, current);
      const dom = current.replace(/(\.png)?$/i, '.html');
      fs.writeFileSync(dom, await page.content());
      console.error(`ui: the page at the failure: ${current} (DOM: ${dom}, URL: ${page.url()})`);
    } catch (e2) {
      console.error(`ui: no screenshot of the failure: ${e2.message}`);
    }
  }
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(rc);
