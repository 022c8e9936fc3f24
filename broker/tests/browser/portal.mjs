// Headless Chromium walk through the broker portal and admin console.
// Driven by broker/tests/browser.rs, which starts the broker, seeds it, runs a host double,
// and checks what this script reports (RESULT_FILE) against the broker's database and key.
//
// Environment: BASE_URL, USER_NAME, USER_PASSWORD, ADMIN_NAME, ADMIN_PASSWORD, POOL_LABEL,
// IMAGE_NAME, GROUP_NAME, SHOTS_DIR, DOWNLOAD_DIR, RESULT_FILE, CHROMIUM (default /usr/bin/chromium).

import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`missing environment variable ${name}`);
  return value;
};
const base = env('BASE_URL');
const shots = env('SHOTS_DIR');
const downloads = env('DOWNLOAD_DIR');
mkdirSync(shots, { recursive: true });
mkdirSync(downloads, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  timeout: 60_000,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = {};
let current = null; // the page in use, for a failure screenshot
const viewport = { width: 1366, height: 768 };

async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

async function login(page, name, password) {
  current = page;
  await page.goto(`${base}/login`);
  await page.getByLabel('User name').fill(name);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL(`${base}/`);
}

try {
  // ----- a user logs in, gets a desktop, connects ---------------------------------------
  const userContext = await browser.newContext({ viewport, acceptDownloads: true });
  userContext.setDefaultTimeout(30_000);
  const page = await userContext.newPage();
  await page.goto(`${base}/login`);
  await shot(page, '01-login');
  await login(page, env('USER_NAME'), env('USER_PASSWORD'));
  await shot(page, '02-portal-pools');
  await page.getByRole('button', { name: `Get a desktop from ${env('POOL_LABEL')}` }).click();
  await page.waitForURL(/notice=allocated/);
  // The host double starts the VM; the page shows the state, reload until it is in use.
  let ready = false;
  for (let i = 0; i < 60 && !ready; i++) {
    ready = (await page.locator('.state-in_use').count()) > 0;
    if (!ready) {
      await page.waitForTimeout(250);
      await page.reload();
    }
  }
  if (!ready) throw new Error('the desktop never became ready');
  await shot(page, '03-portal-desktop-ready');
  await page.getByRole('button', { name: /^Connect to / }).click();
  await page.waitForURL(/\/connect$/);
  await shot(page, '04-connect');
  result.uri = await page.locator('#open-link').getAttribute('href');
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.locator('#download-file').click(),
  ]);
  const file = join(downloads, download.suggestedFilename());
  await download.saveAs(file);
  result.connection_file = file;
  result.suggested_filename = download.suggestedFilename();
  await page.goto(`${base}/`);
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.waitForURL(/\/login$/);
  result.user_logged_out = true;
  await userContext.close();

  // ----- an admin creates a pool and entitles a group ------------------------------------
  const adminContext = await browser.newContext({ viewport });
  adminContext.setDefaultTimeout(30_000);
  const admin = await adminContext.newPage();
  await login(admin, env('ADMIN_NAME'), env('ADMIN_PASSWORD'));
  await admin.goto(`${base}/admin/hosts`);
  await shot(admin, '05-admin-hosts');
  await admin.goto(`${base}/admin/pools`);
  await admin.getByLabel('Name', { exact: true }).fill('design');
  await admin.getByLabel('Display name').fill('Design studio');
  await admin.getByLabel('Kind').selectOption('persistent');
  await admin.getByLabel('Image').selectOption(env('IMAGE_NAME'));
  await admin.getByLabel('Minimum size').fill('0');
  await admin.getByLabel('Maximum size').fill('4');
  await admin.getByLabel('Spare desktops kept running').fill('1');
  await shot(admin, '06-admin-pool-form');
  await admin.getByRole('button', { name: 'Create pool' }).click();
  await admin.waitForURL(/\/admin\/pools\/p-.*notice=created/);
  result.pool_url = admin.url();
  await admin.locator('#ent-kind').selectOption('group');
  await admin.locator('#ent-name').fill(env('GROUP_NAME'));
  await admin.getByRole('button', { name: 'Entitle' }).click();
  await admin.waitForURL(/notice=entitled/);
  result.entitlements = (await admin.locator('#entitlements li').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await shot(admin, '07-admin-pool-entitled');
  await admin.goto(`${base}/admin/sessions`);
  await shot(admin, '08-admin-sessions');
  await admin.goto(`${base}/admin/audit`);
  await shot(admin, '09-admin-audit');
  await adminContext.close();
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
