// Headless Chromium walk through the broker portal and admin console.
// Driven by broker/tests/browser.rs, which starts the broker, seeds it, runs a host double,
// and checks what this script reports (RESULT_FILE) against the broker's database and key.
//
// Environment: BASE_URL, USER_NAME, USER_PASSWORD, ADMIN_NAME, ADMIN_PASSWORD, POOL_LABEL,
// IMAGE_NAME, GROUP_NAME, SHOTS_DIR, DOWNLOAD_DIR, RESULT_FILE, CHROMIUM (default /usr/bin/chromium).

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { base, env, login, newPage, run, shot } from './lib.mjs';

const downloads = env('DOWNLOAD_DIR');
mkdirSync(downloads, { recursive: true });

await run(async (browser, result) => {
  // ----- a user logs in, gets a desktop, connects ---------------------------------------
  const { context: userContext, page } = await newPage(browser, { acceptDownloads: true });
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
  const { context: adminContext, page: admin } = await newPage(browser);
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
  // Data loss prevention: nothing copied in the desktops leaves them.
  await admin.getByLabel('Clipboard: desktop → client').uncheck();
  // Nor does any file from the user's computer get in.
  await admin.getByLabel('File transfer into the desktop').uncheck();
  // Keyboards and mice, and one USB stick by its ids, as an admin might type them.
  await admin.getByLabel('USB devices allowed into the desktop').fill(' class=03, 0525:A4A5');
  await shot(admin, '06-admin-pool-form');
  await admin.getByRole('button', { name: 'Create pool' }).click();
  await admin.waitForURL(/\/admin\/pools\/p-.*notice=created/);
  result.pool_url = admin.url();
  // The pool's page shows the switches as stored.
  result.form_file_transfer = await admin.getByLabel('File transfer into the desktop').isChecked();
  result.form_clipboard_from_guest = await admin.getByLabel('Clipboard: desktop → client').isChecked();
  result.form_usb = await admin.getByLabel('USB devices allowed into the desktop').inputValue();
  await admin.locator('#ent-kind').selectOption('group');
  await admin.locator('#ent-name').fill(env('GROUP_NAME'));
  await admin.getByRole('button', { name: 'Entitle' }).click();
  await admin.waitForURL(/notice=entitled/);
  result.entitlements = (await admin.locator('#entitlements li').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await shot(admin, '07-admin-pool-entitled');
  await admin.goto(`${base}/admin/pools`);
  result.pool_rows = (await admin.locator('tbody tr').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await admin.goto(`${base}/admin/sessions`);
  await shot(admin, '08-admin-sessions');
  await admin.goto(`${base}/admin/audit`);
  await shot(admin, '09-admin-audit');
  // The first pool's desktops, with what their guest agents report.
  await admin.goto(env('POOL_URL'));
  result.desktop_rows = (await admin.locator('#desktops tbody tr').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await shot(admin, '10-admin-pool-desktops');
  await adminContext.close();
});
