// What the browser scripts share: the environment, Chromium, screenshots, logging in, and the
// result file that broker/tests/browser.rs reads.

import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`missing environment variable ${name}`);
  return value;
};
export const base = env('BASE_URL');
export const viewport = { width: 1366, height: 768 };
const shots = env('SHOTS_DIR');
mkdirSync(shots, { recursive: true });

let current = null; // the page in use, for a failure screenshot

export async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

export async function login(page, name, password) {
  current = page;
  await page.goto(`${base}/login`);
  await page.getByLabel('User name').fill(name);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL(`${base}/`);
}

/** A new browser context and page, remembered for a failure screenshot. */
export async function newPage(browser, options = {}) {
  // The test broker's certificate is self-signed (made at its first start).
  const context = await browser.newContext({ viewport, ignoreHTTPSErrors: base.startsWith('https:'), ...options });
  context.setDefaultTimeout(30_000);
  const page = await context.newPage();
  current = page;
  return { context, page };
}

/** Runs `walk(browser, result)` in headless Chromium and writes RESULT_FILE; exits 0 on success. */
export async function run(walk) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: 60_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const result = {};
  try {
    await walk(browser, result);
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = String(e && e.stack || e);
    if (current) {
      result.failed_at = current.url();
      result.failed_page = (await current.content().catch(() => '')).slice(0, 4000);
      await shot(current, 'failure').catch(() => {});
    }
  } finally {
    await browser.close();
    writeFileSync(env('RESULT_FILE'), JSON.stringify(result, null, 2));
  }
  process.exit(result.ok ? 0 : 1);
}
