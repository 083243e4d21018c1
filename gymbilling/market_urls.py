from django.urls import path

from gymbilling import market_apis

urlpatterns = [
    path("market/listings", market_apis.ListingsApi.as_view(), name="market-listings"),
    path(
        "market/listings/<int:listing_id>",
        market_apis.ListingDetailApi.as_view(),
        name="market-listing",
    ),
    path("market/orders", market_apis.OrdersApi.as_view(), name="market-orders"),
    path("market/orders/<int:order_id>", market_apis.OrderDetailApi.as_view(), name="market-order"),
    path("market/sales", market_apis.SalesApi.as_view(), name="market-sales"),
    path("market/earnings", market_apis.EarningsApi.as_view(), name="market-earnings"),
    path("market/payouts", market_apis.PayoutsApi.as_view(), name="market-payouts"),
]
