from django.urls import path

from metering import apis

urlpatterns = [
    path("credits/balance", apis.BalanceApi.as_view(), name="credits-balance"),
    path("credits/lots", apis.LotListApi.as_view(), name="credits-lots"),
    path("credits/ledger", apis.LedgerApi.as_view(), name="credits-ledger"),
    path("usage", apis.UsageApi.as_view(), name="usage"),
]
