// Headless Chromium walk through directory (LDAP) sign-in: an administrator entitles a
// directory group that no member has signed in from yet, a member of it signs in with their
// directory password and sees the pool, a directory user outside the group sees none, a wrong
// password is refused, and the administrator sees the group as the directory's.
// Driven by broker/tests/browser.rs (`directory_sign_in_in_chromium`), which starts slapd and the
// broker and checks this script's RESULT_FILE against the broker's database.
//
// Environment: BASE_URL, ADMIN_NAME, ADMIN_PASSWORD, POOL_URL (the pool's admin page),
// POOL_LABEL, GROUP_NAME, MEMBER_NAME, MEMBER_PASSWORD, OUTSIDER_NAME, OUTSIDER_PASSWORD,
// SHOTS_DIR, RESULT_FILE, CHROMIUM.

import { base, env, login, newPage, run, shot } from './lib.mjs';

await run(async (browser, result) => {
  // ----- the administrator (a local account) entitles the directory's group -------------
  const { context: adminContext, page: admin } = await newPage(browser);
  await login(admin, env('ADMIN_NAME'), env('ADMIN_PASSWORD'));
  await admin.goto(env('POOL_URL'));
  await admin.locator('#ent-kind').selectOption('group');
  await admin.locator('#ent-name').fill(env('GROUP_NAME'));
  await admin.getByRole('button', { name: 'Entitle' }).click();
  await admin.waitForURL(/notice=entitled/);
  result.entitlements = (await admin.locator('#entitlements li').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await shot(admin, 'd1-admin-entitles-directory-group');

  // ----- a member of the group signs in with the directory's password --------------------
  const { context: memberContext, page: member } = await newPage(browser);
  await member.goto(`${base}/login`);
  await member.getByLabel('User name').fill(env('MEMBER_NAME'));
  await member.getByLabel('Password').fill('not-the-directory-password');
  await member.getByRole('button', { name: 'Log in' }).click();
  result.wrong_password = (await member.locator('[role=alert]').allInnerTexts()).join(' ').trim();
  await shot(member, 'd2-directory-wrong-password');
  await login(member, env('MEMBER_NAME'), env('MEMBER_PASSWORD'));
  result.member_pools = await member.getByRole('button', { name: /^Get a desktop from / })
    .evaluateAll((buttons) => buttons.map((b) => b.getAttribute('aria-label')));
  result.member_header = (await member.locator('header').innerText()).replace(/\s+/g, ' ').trim();
  await shot(member, 'd3-directory-member-portal');
  await memberContext.close();

  // ----- a directory user outside the group signs in and sees no pool --------------------
  const { context: outsiderContext, page: outsider } = await newPage(browser);
  await login(outsider, env('OUTSIDER_NAME'), env('OUTSIDER_PASSWORD'));
  result.outsider_pools = await outsider.getByRole('button', { name: /^Get a desktop from / }).count();
  result.outsider_text = (await outsider.locator('main').innerText()).replace(/\s+/g, ' ').trim();
  await shot(outsider, 'd4-directory-outsider-portal');
  await outsiderContext.close();

  // ----- the administrator sees who came from the directory ------------------------------
  await admin.goto(`${base}/admin/users`);
  result.user_rows = (await admin.locator('table').first().locator('tbody tr').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  result.group_rows = (await admin.locator('table').nth(1).locator('tbody tr').allInnerTexts()).map((t) => t.replace(/\s+/g, ' ').trim());
  await shot(admin, 'd5-admin-users-and-groups');
  await adminContext.close();
});
