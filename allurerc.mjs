// Allure 3 (npm package "allure"): group the report by host, then feature (the labels kvmcheck sets).
//   npx allure generate reports/allure -o reports/allure-report --config allurerc.mjs
export default {
  name: "kvmcheck",
  plugins: { awesome: { options: { groupBy: ["parentSuite", "suite"] } } },
};
