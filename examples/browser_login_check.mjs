// Walk the upstream login flow in a real browser (headless Chromium), as a user would.
//
//   npm install playwright-core          # plus a Chromium: apt-get install chromium
//   python mcp_server.py --no-auth       # then call the `login` tool and take its url and pairing code
//   node examples/browser_login_check.mjs URL PAIRING-CODE [CHROMIUM]
//
// It opens the login link, types the pairing code, signs in at the provider (the sandbox, as OAuth 2
// or as Kite Connect, as the demo user asha; or any provider whose sign-in page is one button, such
// as the fake OpenID provider of examples/provider_browser_check.py) and stops on the success page
// (a screenshot goes to signed-in.png).  Afterwards the `holdings` tool answers with masked data.
import { chromium } from "playwright-core";

const [url, code, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
if (!url || !code) {
  console.error("usage: node examples/browser_login_check.mjs URL PAIRING-CODE [CHROMIUM]");
  process.exit(2);
}
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
try {
  const page = await browser.newPage();
  await page.goto(url);
  console.log("1.", await page.title());
  await page.fill("input[name=code]", code);
  await Promise.all([page.waitForNavigation(), page.click("button")]);
  console.log("2.", await page.title());
  // the sandbox (OAuth 2 or Kite) asks which demo user; a provider without the choice just signs in
  if (await page.locator("select[name=user]").count()) await page.selectOption("select[name=user]", "asha");
  await Promise.all([page.waitForNavigation(), page.click("button")]);
  console.log("3.", await page.title());
  await page.screenshot({ path: "signed-in.png" });
  if (!(await page.title()).includes("signed in")) process.exit(1);
} finally {
  await browser.close();
}
